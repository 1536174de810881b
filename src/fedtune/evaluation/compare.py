"""``fedtune compare``: base vs local-only vs federated vs centralized, on one partition.

The comparison folder (``output.dir`` of the config) holds one run per trained model::

    <output.dir>/federated/  centralized/  local-<id>/ ...   ordinary run directories
    <output.dir>/partition.json   comparison.json   report.html   *.png

Runs are trained with the engine's modes (``federation/baselines.py`` defines the budgets),
or reused when a finished run with the same config is already there (an unfinished one is
resumed), so a comparison can be interrupted, extended and redrawn. Every run must have
split the data exactly as this config does (``partition.json`` is checked), so all models
are evaluated on the same held-out rows. Evaluation then loads the base model once and, for
each model, loads its final adapter (base: LoRA disabled) and measures held-out loss and
perplexity per category, ROUGE-L and exact match of greedy answers to the same held-out
prompts (the trained models answer together, each row of a batch with its own adapter:
model/row_adapters.py), if ``eval.judge.base_url`` is set, LLM-judge scores against the reference answers, and,
if ``eval.harness_tasks`` names lm-evaluation-harness tasks, their metrics (evaluation/harness.py).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fedtune.config import RunConfig, load_config, resume_differences
from fedtune.errors import CheckpointError, ConfigError
from fedtune.evaluation import harness
from fedtune.evaluation.evaluate import answer_models, build_eval_set, evaluate_model, judge_answers, require_sft
from fedtune.evaluation.gaps import answer_intervals, loss_gaps
from fedtune.evaluation.grading import Question
from fedtune.federation import baselines, setup
from fedtune.federation.engine import run
from fedtune.federation.rundir import (
    COMPARISON_FILE, CONFIG_FILE, FINAL_ADAPTER, METRICS_FILE, PARTITION_FILE, RunResult, finished_adapter, lock_run_dir,
)
from fedtune.model.lora import load_adapter
from fedtune.reporting.metrics import read_metrics
from fedtune.reporting.progress import LOADING, Progress
from fedtune.reporting.report import typical_local, write_report
from fedtune.seeding import generator

BASE = "base"


@dataclass
class CompareResult:
    folder: Path
    comparison: Optional[dict]  # None when stopped (Ctrl-C) before every run finished


def plan_runs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """(name, config) of every run the comparison trains, in ``compare.models`` order."""
    root = Path(cfg.output.dir)
    runs: list[tuple[str, RunConfig]] = []
    for model in cfg.compare.models:
        if model == "local":
            runs += [(Path(c.output.dir).name, c) for c in baselines.local_configs(cfg, root)]
        elif model != BASE:
            runs.append((model, baselines.with_mode(cfg, model, root / model)))
    return runs


def run_or_reuse(cfg: RunConfig, *, reuse: bool, progress: Progress, stop: threading.Event) -> str:
    """Make sure ``cfg.output.dir`` holds the finished run of ``cfg``: "reused" (already
    there), "resumed", "ran", or "stopped" (interrupted; run again to continue)."""
    run_dir = Path(cfg.output.dir)
    if reuse and (run_dir / CONFIG_FILE).is_file():
        saved = load_config(run_dir / CONFIG_FILE)
        diffs = resume_differences(saved, cfg)
        same_rounds = saved.federation.rounds == cfg.federation.rounds
        if not diffs and same_rounds and finished_adapter(run_dir) is not None:
            return "reused"
        if not diffs and saved.federation.rounds <= cfg.federation.rounds:
            return "resumed" if run(cfg, resume=True, progress=progress, stop=stop).finished else "stopped"
        if not cfg.output.overwrite:
            why = "; ".join(diffs) or f"federation.rounds (run: {saved.federation.rounds}, now: {cfg.federation.rounds})"
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({why}); set output.overwrite=true to retrain it, "
                "or choose another output.dir"
            )
    return "ran" if run(cfg, progress=progress, stop=stop).finished else "stopped"


def run_local_each(cfg: RunConfig, *, progress: Optional[Progress] = None, stop: Optional[threading.Event] = None) -> list[RunResult]:
    """``federation.mode=local`` with several clients: one run per client in
    ``<output.dir>/local-<id>``, one after another (stops early when interrupted)."""
    progress, stop = progress or Progress(), stop or threading.Event()
    results = []
    with lock_run_dir(Path(cfg.output.dir)):  # the folder of the per-client runs; each run locks its own as well
        for sub in baselines.local_configs(cfg, cfg.output.dir):
            progress.message(f"local-only client {sub.local.clients[0]} -> {sub.output.dir}")
            results.append(run(sub, progress=progress, stop=stop))
            if not results[-1].finished:
                break
    return results


def compare(cfg: RunConfig, *, progress: Optional[Progress] = None, stop: Optional[threading.Event] = None) -> CompareResult:
    """Train (or reuse) every compared run, evaluate all models alike, write
    ``comparison.json`` and ``report.html`` in ``output.dir``."""
    with lock_run_dir(Path(cfg.output.dir)):  # one compare per folder; each run locks its own as well
        return _compare(cfg, progress or Progress(), stop or threading.Event())


def _compare(cfg: RunConfig, progress: Progress, stop: threading.Event) -> CompareResult:
    require_sft(cfg)
    root = Path(cfg.output.dir)
    runs = plan_runs(cfg)
    names = ([BASE] if BASE in cfg.compare.models else []) + [n for n, _ in runs]
    reference = cfg.eval.judge.reference
    if cfg.eval.judge.base_url and reference not in ("data", *names):
        raise ConfigError(f"eval.judge.reference: '{reference}' is neither 'data' nor a compared model ({', '.join(names)})")
    bench = harness_tasks(cfg)  # lm-eval installed and the tasks known: checked before any training
    for name, sub in runs:
        status = run_or_reuse(sub, reuse=cfg.compare.reuse, progress=progress, stop=stop)
        progress.message(f"compare: {name} {status} ({sub.output.dir})")
        if status == "stopped":
            return CompareResult(root, None)

    examples, _ = setup.load_data(cfg)
    partition = setup.make_partition(cfg, examples)
    categories = [e.category for e in examples]
    shared = partition.to_json(categories)
    check_partitions(root, [n for n, _ in runs], shared)
    (root / PARTITION_FILE).write_text(json.dumps(shared))

    with progress.phase(LOADING):
        bundle = setup.build_model(cfg)
    evalset = build_eval_set(cfg, bundle, [examples[i] for i in partition.holdout], progress)
    trained = {name: load_adapter(root / name / FINAL_ADAPTER)[0] for name in names if name != BASE}
    options = dict(template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.generation_batch_size,
                   progress=progress)
    answers = answer_models(bundle, evalset, trained, **options)
    if answers:
        progress.message(f"compare: answered with {', '.join(trained)} together")
    results = {}
    for name in names:
        progress.message(f"compare: evaluating {name}")
        results[name] = evaluate_model(bundle, evalset, trained.get(name), per_example=True, answers=answers.get(name), **options)
        if bench is not None:
            progress.message(f"compare: lm-evaluation-harness on {name} ({', '.join(bench[1])})")
            results[name]["harness"] = harness.evaluate_adapter(bundle, trained.get(name), *bench, limit=cfg.eval.harness_limit,
                                                                batch_size=cfg.eval.batch_size, progress=progress)["values"]
    judge = _judge(cfg, evalset.questions, {n: r["answers"] for n, r in results.items()}, progress)
    per_example = {n: results[n]["heldout"].pop("per_example") for n in names}  # kept out of comparison.json
    comparison = assemble(cfg, root, names, results, evalset, shared, judge)
    comparison["summary"].update(intervals(cfg, per_example, {n: results[n]["answers"] for n in names},
                                           [evalset.examples[i].output for i in evalset.answered]))
    (root / COMPARISON_FILE).write_text(json.dumps(comparison, indent=1))
    write_report(root)
    return CompareResult(root, comparison)


def harness_tasks(cfg: RunConfig) -> Optional[tuple]:
    """(lm-eval task index, task names) of ``eval.harness_tasks``, or None when there are none."""
    if not cfg.eval.harness_tasks:
        return None
    return harness.load_tasks(cfg.eval.harness_tasks, cfg.eval.harness_include_path)


def check_partitions(root: Path, names: list[str], shared: dict) -> None:
    """Every compared run split the data exactly as ``shared`` (same rows, same held-out set)."""
    keys = ("data_fingerprint", "holdout", "clients")
    for name in names:
        path = root / name / PARTITION_FILE
        saved = json.loads(path.read_text()) if path.is_file() else {}
        differs = [k for k in keys if saved.get(k) != shared[k]]
        if differs:
            raise CheckpointError(
                f"{path}: {', '.join(differs)} differ from this config's partition (the data changed?); "
                "rerun the comparison with output.overwrite=true"
            )


def _judge(cfg: RunConfig, questions: list[Question], answers: dict[str, list[str]], progress: Progress) -> Optional[dict]:
    reference = cfg.eval.judge.reference
    if reference != "data":  # a compared model's answers are the reference (checked in compare)
        questions = [Question(q.text, a) for q, a in zip(questions, answers[reference])]
        answers = {m: a for m, a in answers.items() if m != reference}
    return judge_answers(cfg.eval.judge, questions, answers, on_model=lambda m: progress.message(f"compare: judging {m}"),
                         progress=progress)


def _run_records(run_dir: Path) -> list[dict]:
    return list(read_metrics(run_dir / METRICS_FILE)) if (run_dir / METRICS_FILE).is_file() else []


def assemble(cfg: RunConfig, root: Path, names: list[str], results: dict, evalset, partition: dict, judge: Optional[dict]) -> dict:
    """The comparison record (``comparison.json``), read by the report and the CLI table."""
    records = {n: _run_records(root / n) for n in names if n != BASE}
    fits = {n: [r for r in recs if r["type"] == "fit"] for n, recs in records.items()}
    budget = {n: {"optimizer_steps": sum(int(f["steps"]) for f in fs), "tokens": sum(int(f["tokens"]) for f in fs),
                  "fits": len(fs)} for n, fs in fits.items()}
    budget[BASE] = {"optimizer_steps": 0, "tokens": 0, "fits": 0}
    curves = {n: [(r["round"], r["loss"]) for r in recs if r["type"] == "eval"] for n, recs in records.items()}
    if BASE in results:
        curves[BASE] = [(0, results[BASE]["heldout"]["loss"]), (cfg.federation.rounds, results[BASE]["heldout"]["loss"])]
    loss = {n: results[n]["heldout"]["loss"] for n in names}
    answered = [evalset.examples[i] for i in evalset.answered]
    return {
        "name": root.name,
        "description": f"{cfg.model.name} on {cfg.data.path}: {partition['num_clients']} clients ({partition['method']} split), "
                       f"{cfg.federation.rounds} rounds; {len(evalset.examples)} held-out examples, {len(answered)} answered",
        "budget_note": budget_note(cfg, budget),
        "models": names,
        "heldout": {n: results[n]["heldout"] for n in names},
        "generation": {n: results[n]["generation"] for n in names},
        "judge": judge and judge["models"],
        "harness": {n: results[n]["harness"] for n in names} if "harness" in results[names[0]] else None,
        "judge_note": judge and judge_note(judge, cfg.eval.judge.reference),
        "judge_reference_ratings": judge and judge["reference_ratings"],
        "judge_reference": judge and cfg.eval.judge.reference,
        "budget": budget,
        "engines": {n: load_config(root / n / CONFIG_FILE).federation.engine for n in names if n != BASE},
        "curves": curves,
        "participation": [(r["round"], r["clients"]) for r in records.get("federated", []) if r["type"] == "round"],
        "partition": {"method": partition["method"], "num_clients": partition["num_clients"], "categories": partition["categories"],
                      "holdout": len(partition["holdout"])},
        "samples": [{"prompt": e.instruction, "input": e.input, "reference": e.output, "category": e.category,
                     "answers": {n: results[n]["answers"][k] for n in names}} for k, e in enumerate(answered)],
        "summary": {"typical_local": typical_local(loss), "ordering": ordering(loss), "losses": loss},
    }


def intervals(cfg: RunConfig, per_example: dict[str, dict], answers: dict[str, list[str]], references: list[str]) -> dict:
    """{"gaps": the held-out loss gaps with paired bootstrap intervals over examples,
    "generation": ROUGE-L / exact match with intervals over the answers} (evaluation/gaps.py),
    from generators derived from ``seed``."""
    e = cfg.eval
    return {
        "gaps": loss_gaps(per_example, generator(cfg.seed, "bootstrap", 0), resamples=e.bootstrap_resamples, level=e.confidence),
        "generation": answer_intervals(answers, references, generator(cfg.seed, "bootstrap", 1),
                                       resamples=e.bootstrap_resamples, level=e.confidence),
    }


def ordering(loss: dict[str, float]) -> dict[str, bool]:
    """The FedIT ordering on held-out loss: centralized <= federated < typical local-only < base."""
    local = typical_local(loss)
    checks = {}
    if "centralized" in loss and "federated" in loss:
        checks["centralized <= federated"] = loss["centralized"] <= loss["federated"]
    if "federated" in loss and local is not None:
        checks["federated < local (median)"] = loss["federated"] < local
    if local is not None and BASE in loss:
        checks["local (median) < base"] = local < loss[BASE]
    return checks


def budget_note(cfg: RunConfig, budget: dict) -> str:
    steps = {n: b["optimizer_steps"] for n, b in budget.items()}
    per_round = f"train.local_steps={cfg.train.local_steps}" if cfg.train.local_steps else f"train.local_epochs={cfg.train.local_epochs}"
    trained = ", ".join(f"{n} {s}" for n, s in steps.items() if n != BASE)
    parts = [f"optimizer steps (batch {cfg.train.batch_size} x {cfg.train.grad_accum}): {trained}."] if trained else []
    if "centralized" in steps:
        parts.append("centralized: one client holding every training shard, taking in each round the steps the federated "
                     "schedule gives that round, so its total equals the federated run's.")
    if any(n.startswith("local-") for n in steps):
        parts.append(f"local-<id>: that client alone on its own shard, all {cfg.federation.rounds} rounds, "
                     f"{per_round} per round as when sampled in the federation.")
    if cfg.federation.engine == "flower":
        parts.append("engine: the federated and local-only runs ran on Flower's simulation"
                     + ("; centralized ran in-process, since pooling every client's data in one place is what a "
                        "federation on Flower never does." if "centralized" in steps else "."))
    if BASE in cfg.compare.models:
        parts.append("base: the base model with LoRA disabled (no training).")
    parts.append("All models are evaluated on the same held-out rows.")
    return " ".join(parts)


def judge_note(judge: dict, reference: str) -> str:
    stats = judge["client"]
    ref = "the held-out reference answers" if reference == "data" else f"the answers of {reference}"
    return (f"judge {judge['judge_model']}, {judge['questions']} questions per model, relative to {ref} "
            f"(relative score = sum of the model's 1-10 ratings / sum of the reference's; wins/ties/losses from pairwise "
            f"judgements in both orders); {stats['requests']} requests, {stats['cached']} from the cache, {stats['retries']} retries")
