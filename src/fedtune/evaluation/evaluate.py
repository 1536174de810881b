"""Evaluate one model — the base model (adapter disabled) or an adapter on it — on a set of
examples: held-out loss and perplexity per category, generation metrics (ROUGE-L, exact match)
on a bounded subset, and, when a judge is configured, LLM-judge scores.

``evaluate_run`` is ``fedtune eval RUN_DIR [--data FILE]``: a run's adapter on its own held-out
set (the rows ``partition.json`` held out) or on any instruction file.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from fedtune.config import JudgeConfig, RunConfig, from_dict, parse_overrides, read_yaml
from fedtune.data.prompts import user_message
from fedtune.data.sources import Example, load_examples
from fedtune.errors import CheckpointError, ConfigError
from fedtune.evaluation.base_cache import BaseEvalCache
from fedtune.evaluation.generation import pick_generation_subset, score_answers
from fedtune.evaluation.grading import Question, grade
from fedtune.evaluation.heldout import HeldoutEvaluator
from fedtune.federation import setup
from fedtune.federation.loader import RUN, folder_kind, load_any_model
from fedtune.model.lora import load_adapter, set_adapter
from fedtune.model.row_adapters import answer_each, stacks
from fedtune.federation.rundir import CONFIG_FILE, EVALUATIONS, PARTITION_FILE
from fedtune.reporting.progress import JUDGING, LOADING, TOKENISING, Progress
from fedtune.reporting.report import write_report
from fedtune.types import Adapter

@dataclass
class EvalSet:
    """Examples to evaluate on, their batches, which of them are answered, and where base-model
    results are kept (evaluation/base_cache.py)."""

    examples: list[Example]
    evaluator: HeldoutEvaluator
    answered: list[int]  # positions into examples answered for generation metrics
    cache: BaseEvalCache = field(default_factory=lambda: BaseEvalCache(None))

    @property
    def questions(self) -> list[Question]:
        return [Question(user_message(e.instruction, e.input), e.output) for e in (self.examples[i] for i in self.answered)]


def build_eval_set(cfg: RunConfig, bundle: setup.ModelBundle, examples: Sequence[Example],
                   progress: Optional[Progress] = None) -> EvalSet:
    examples = list(examples)
    with (progress or Progress()).phase(TOKENISING):
        encoded = setup.encode_examples(bundle.tokenizer, examples, cfg.data.template, cfg.data.max_length)
    evaluator = setup.build_evaluator(cfg, bundle, encoded, [e.category for e in examples])
    answered = pick_generation_subset([e.category for e in examples], cfg.eval.generation_examples)
    return EvalSet(examples, evaluator, answered, setup.build_base_cache(cfg))


def evaluate_model(bundle: setup.ModelBundle, evalset: EvalSet, adapter: Optional[Adapter], *, template: str,
                   max_new_tokens: int, batch_size: int, as_loaded: bool = False, progress: Optional[Progress] = None,
                   per_example: bool = False, answers: Optional[list[str]] = None) -> dict:
    """``{"heldout", "generation", "answers"}`` with ``adapter`` loaded, or for the base model
    (LoRA disabled) when ``adapter`` is None; with ``as_loaded``, the model as it stands (a
    merged model, or an adapter folder's model). Answers are greedy, ``batch_size`` prompts at
    a time, unless given (``answers``: this model's, generated with others by :func:`answer_models`). The base model's results, and an adapter's held-out loss (a run's final evaluation
    stores it), come from ``evalset.cache`` when stored there. ``progress``
    sees the held-out loss and the generation as phases; with ``per_example``, "heldout" holds
    each example's NLL and token count too (HeldoutEvaluator.evaluate)."""
    if adapter is not None:
        set_adapter(bundle.params, adapter)
    base = adapter is None and not as_loaded
    loss_cache = BaseEvalCache(None) if as_loaded else evalset.cache  # an adapter's: stored by the run's final round
    answer_cache = evalset.cache if base else BaseEvalCache(None)
    chosen = [evalset.examples[i] for i in evalset.answered]
    with bundle.model.disable_adapter() if base else contextlib.nullcontext():
        heldout = loss_cache.evaluate(bundle, evalset.evaluator, lambda full: evalset.evaluator.evaluate(bundle.model, progress, per_example=full),
                                      progress, per_example=per_example, adapter=adapter)
        if answers is None:
            answers = answer_cache.answer_prompts(bundle, [e.instruction for e in chosen], [e.input for e in chosen], template=template,
                                                  max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    generation = score_answers(answers, [e.output for e in chosen], [e.category for e in chosen])
    return {"heldout": heldout, "generation": generation, "answers": answers}


def answer_models(bundle: setup.ModelBundle, evalset: EvalSet, adapters: dict[str, Adapter], *, template: str,
                  max_new_tokens: int, batch_size: int, progress: Optional[Progress] = None) -> dict[str, list[str]]:
    """Each adapter's greedy answers to ``evalset``'s answered prompts, generated together in
    shared batches (model/row_adapters.py); {} for fewer than two adapters or a LoRA that does
    not stack (:func:`evaluate_model` then answers one model at a time)."""
    if not stacks(bundle.model, list(adapters.values())):
        return {}
    chosen = [evalset.examples[i] for i in evalset.answered]
    answers = answer_each(bundle.model, bundle.params, list(adapters.values()), bundle.tokenizer, [e.instruction for e in chosen],
                          inputs=[e.input for e in chosen], template=template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          progress=progress)
    return dict(zip(adapters, answers))


def judge_answers(judge: JudgeConfig, questions: list[Question], answers: dict[str, list[str]],
                  on_model: Optional[Callable[[str], None]] = None, progress: Optional[Progress] = None) -> Optional[dict]:
    """LLM-judge grades of each model's answers against ``questions``' references, or None
    when no judge is configured (``eval.judge.base_url`` unset). ``progress`` sees the judge
    calls as a phase (cached answers count too)."""
    if not judge.base_url:
        return None
    from fedtune.evaluation.judge import build_judge

    client = build_judge(
        judge.base_url, judge.model, api_key_env=judge.api_key_env, cache_dir=judge.cache_dir,
        requests_per_second=judge.requests_per_second, max_retries=judge.max_retries, backoff=judge.backoff,
        timeout=judge.timeout, max_tokens=judge.max_tokens,
    )
    n = judge.examples or len(questions)
    asked = min(n, len(questions))
    single, pairwise = judge.grading in ("single", "both"), judge.grading in ("pairwise", "both")
    calls = asked * (single + len(answers) * (single + 2 * pairwise))  # reference ratings; each answer rated, judged both ways
    with (progress or Progress()).phase(JUDGING, calls) as shown:
        def complete(messages: list[dict]) -> str:
            reply = client.complete(messages)
            shown.advance()
            return reply

        graded = grade(complete, questions[:n], {m: a[:n] for m, a in answers.items()}, protocol=judge.grading, on_model=on_model)
    return {**graded, "judge_model": judge.model, "questions": asked, "client": dict(client.stats)}


def require_sft(cfg: RunConfig) -> None:
    if cfg.task != "sft":
        raise ConfigError(f"task: evaluation by generation (eval, compare) is for task=sft runs, not task={cfg.task}")


def run_heldout(cfg: RunConfig, run_dir: Path) -> list[Example]:
    """The held-out rows of a run, as its ``partition.json`` recorded them."""
    examples, _ = setup.load_data(cfg)
    path = run_dir / PARTITION_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; pass the held-out data with --data FILE")
    saved = json.loads(path.read_text())
    if saved.get("data_fingerprint") != setup.fingerprint(examples):
        raise CheckpointError(f"{path}: data.path no longer holds the data this run was split from; pass --data FILE")
    return [examples[i] for i in saved["holdout"]]


def evaluate_run(run_dir: Path, *, data: Optional[str] = None, base: bool = False, overrides: Sequence[str] = (),
                 progress: Optional[Progress] = None) -> dict:
    """Evaluate a run's adapter (or, with ``base``, its base model) on its held-out set or on
    ``data`` (read with the run's ``data.columns``; ``overrides`` such as
    ``data.columns.output=response`` or ``eval.generation_examples=100`` adjust the run's
    config). Writes ``run_dir/evaluations/<name>.json``, refreshes the run's report and
    returns the record. ``progress`` sees every phase (model load, tokenisation, held-out
    loss, generation, judge calls)."""
    progress = progress or Progress()
    run_dir = Path(run_dir)
    if folder_kind(run_dir) != RUN:
        return evaluate_folder(run_dir, data=data, base=base, overrides=overrides, progress=progress)
    cfg = from_dict(parse_overrides(read_yaml(run_dir / CONFIG_FILE), list(overrides)))
    require_sft(cfg)
    if data is None:
        examples, source = run_heldout(cfg, run_dir), "the run's held-out set"
    else:
        d = cfg.data
        examples, report = load_examples(data, asdict(d.columns), split=d.split, subset=d.subset, skip_invalid=d.skip_invalid,
                                         instruction_categories=d.instruction_categories)
        source = f"{report.source} ({report.rows} rows, {report.skipped} skipped)"
    with progress.phase(LOADING):
        _, bundle, folder = setup.load_run_model(run_dir)
    evalset = build_eval_set(cfg, bundle, examples, progress)
    adapter = None if base else load_adapter(folder)[0]
    result = evaluate_model(bundle, evalset, adapter, template=cfg.data.template,
                            max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.generation_batch_size, progress=progress)
    name = ("base-" if base else "") + ("heldout" if data is None else Path(data).stem)
    what = "base model (adapter disabled)" if base else f"adapter {folder}"
    record = make_record(name, f"{what} on {source}", cfg, evalset, result, "base" if base else run_dir.name, progress)
    save_record(run_dir, record)
    write_report(run_dir)
    return record


def make_record(name: str, what: str, cfg: RunConfig, evalset: EvalSet, result: dict, model_name: str,
                progress: Progress) -> dict:
    """The saved evaluation record (held-out, generation, judge, samples) of ``result``."""
    answers = result["answers"]
    return {
        "name": name,
        "description": f"{what}: {len(evalset.examples)} examples, {len(evalset.answered)} answered",
        "heldout": result["heldout"],
        "generation": result["generation"],
        "judge": judge_answers(cfg.eval.judge, evalset.questions, {model_name: answers}, progress=progress),
        "samples": [{"prompt": q.text, "reference": q.reference, "answer": a} for q, a in zip(evalset.questions, answers)],
    }


def save_record(folder: Path, record: dict) -> None:
    out = folder / EVALUATIONS / f"{record['name']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=1))


def evaluate_folder(folder: Path, *, data: Optional[str], base: bool, overrides: Sequence[str],
                    progress: Optional[Progress] = None) -> dict:
    """``evaluate_run`` for a PEFT adapter folder or a merged model folder: on ``data`` (there is
    no held-out set), with the default config's ``data.columns`` and ``eval.*`` under ``overrides``;
    the record goes to ``folder/evaluations/``."""
    if data is None:
        raise ConfigError(f"{folder} is not a run directory, so it has no held-out set; pass --data FILE")
    progress = progress or Progress()
    with progress.phase(LOADING):
        loaded = load_any_model(folder)
    if base:
        loaded.check_base()
    cfg = from_dict(parse_overrides({"data": {"template": loaded.template}}, list(overrides)))
    require_sft(cfg)
    d = cfg.data
    examples, report = load_examples(data, asdict(d.columns), split=d.split, subset=d.subset, skip_invalid=d.skip_invalid,
                                     instruction_categories=d.instruction_categories)
    evalset = build_eval_set(cfg, loaded.bundle, examples, progress)
    result = evaluate_model(loaded.bundle, evalset, None, template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.generation_batch_size, as_loaded=not base, progress=progress)
    what = f"{'base model of ' if base else ''}{loaded.kind} folder {folder}"
    source = f"{report.source} ({report.rows} rows, {report.skipped} skipped)"
    record = make_record(("base-" if base else "") + Path(data).stem, f"{what} on {source}", cfg, evalset, result, folder.name, progress)
    save_record(folder, record)
    return record
