"""Evaluation as lean as training: held-out tokens/s packed vs padded vs training, and the
wall time of ``fedtune compare configs/demo-compare.yaml`` before/after with its evaluation share.

1. Held-out evaluation throughput, in one process: the demo-compare held-out set (80 rows) on
   SmolLM2-135M, evaluated padded (the old path), packed (per-example attention, the
   training token budget) and as ``fedtune`` now evaluates (packed, training's precision, the
   shared prompt prefix run once), alternately, best of ``--repeats``; and training real tokens/s
   (LocalTrainer, the demo-compare settings) on the same model.
2. Compare wall time: the same compare run by the code of ``--before`` (a git revision,
   unpacked with ``git archive``; default: the commit before lean evaluation) and by this
   tree, back to back, each in a fresh process, output folder and evaluation cache (a first
   compare, not a re-run; the bundled model's one-time conversion is shared). Evaluation seconds are the summed
   durations of the evaluation phases the progress events report (round evaluations,
   sample answers, the compare's held-out loss, answers, reference log-probs).

    python -m benchmarks.evaluation                    # both parts, demo-compare at 2 rounds
    python -m benchmarks.evaluation --rounds 5         # the recipe's full 5 rounds
    python -m benchmarks.evaluation --skip-compare     # part 1 only

Figures carry the CPU model and flags; compare only within one results file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BUNDLED, RESULTS, ROOT, env, machine, write_json

BEFORE = "73d15ca"  # main before lean evaluation (padded eval, no base cache)
EVAL_PHASES = ("evaluation", "sample answers", "held-out loss", "generating answers", "reference log-probs")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")


def cpu() -> dict:
    """CPU model and the flags that decide kernels and precision=auto."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags]}


# ----------------------------------------------------------------------------- part 1


def heldout_throughput(repeats: int) -> dict:
    import torch

    from fedtune.config import load_config
    from fedtune.evaluation.heldout import HeldoutEvaluator
    from fedtune.federation import setup
    from fedtune.model.attention import use_packed_attention

    cfg = load_config(str(ROOT / "configs" / "demo-compare.yaml"), [f"model.name={BUNDLED}", "output.dir=/tmp/unused"])
    bundle = setup.build_model(cfg)
    examples, _ = setup.load_data(cfg)
    partition = setup.make_partition(cfg, examples)
    encoded = setup.encode_examples(bundle.tokenizer, examples, cfg.data.template, cfg.data.max_length)
    held = [encoded[i] for i in partition.holdout]
    cats = [examples[i].category for i in partition.holdout]
    assert use_packed_attention(bundle.model)
    budget = setup.batch_token_limit(cfg.train.max_batch_tokens, bundle.device)
    evaluators = {
        "padded": HeldoutEvaluator(held, cats, batch_size=cfg.eval.batch_size, pad_id=bundle.tokenizer.pad_token_id),
        "packed": HeldoutEvaluator(held, cats, batch_size=cfg.eval.batch_size, pad_id=bundle.tokenizer.pad_token_id,
                                   packing=True, max_tokens=budget),
        f"packed+{bundle.precision}": HeldoutEvaluator(held, cats, batch_size=cfg.eval.batch_size, pad_id=bundle.tokenizer.pad_token_id,
                                                       packing=True, max_tokens=budget, precision=bundle.precision),
        "now": setup.build_evaluator(cfg, bundle, held, cats),
    }  # padded: the old path (fp32, padded); now: what setup.build_evaluator builds (+ the shared prompt prefix run once)
    for ev in evaluators.values():  # warm-up: one-time kernel and allocator costs are not the evaluator's
        HeldoutEvaluator(held[:4], cats[:4], batch_size=4, pad_id=0, packing=ev.batching["packing"],
                         precision=ev.batching["precision"], shared_prefix=bool(ev.batching["shared_prefix"])).evaluate(bundle.model)
    real = sum(int(e.input_ids.numel()) for e in held)
    best, loss = {}, {}
    for _ in range(repeats):
        for name, ev in evaluators.items():  # alternate: machine noise spreads over both
            started = time.perf_counter()
            loss[name] = ev.evaluate(bundle.model)["loss"]
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    trainer = setup.build_trainer(cfg, bundle)
    shard = [encoded[i] for i in partition.shards[0]]
    trainer.fit(0, shard, bundle.initial_adapter, round=1, lr=cfg.train.lr, local_steps=1)  # warm-up
    fit = trainer.fit(0, shard, bundle.initial_adapter, round=1, lr=cfg.train.lr, local_steps=cfg.train.local_steps)
    padded_tokens = sum(b["input_ids"].numel() for b, _ in evaluators["padded"].batches)
    return {
        "rows": len(held), "real_tokens": real, "padded_tokens_padded_path": padded_tokens, "eval_batch_size": cfg.eval.batch_size,
        "pack_budget_tokens": budget, "model_dtype": str(next(bundle.model.parameters()).dtype),
        "eval_real_tokens_per_s": {n: real / s for n, s in best.items()},
        "eval_seconds": best, "heldout_loss": loss,
        "packed_vs_padded": best["padded"] / best["packed"],
        "now_vs_padded": best["padded"] / best["now"], "now_batching": evaluators["now"].batching,
        "now_real_tokens_run": real - len(held) * evaluators["now"].batching["shared_prefix"],
        "train_real_tokens_per_s": fit.metrics["real_tokens"] / fit.metrics["seconds"],
        "train_precision": bundle.precision, "train_steps": fit.metrics["steps"],
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- part 2


def compare_child(out: Path, overrides: list[str]) -> None:
    """Run one compare (the fedtune on sys.path) and write wall time and phase seconds."""
    from fedtune.config import load_config
    from fedtune.evaluation.compare import compare
    from fedtune.reporting.progress import Progress

    class Timer(Progress):
        def __init__(self):
            self.phases: dict[str, float] = {}
            self.fit_seconds = 0.0

        def phase_finished(self, name, seconds):
            self.phases[name] = self.phases.get(name, 0.0) + seconds

        def client_finished(self, round, client, metrics):
            self.fit_seconds += float(metrics.get("seconds", 0.0))

    cfg = load_config(str(ROOT / "configs" / "demo-compare.yaml"), overrides)
    timer = Timer()
    started = time.perf_counter()
    result = compare(cfg, progress=timer)
    wall = time.perf_counter() - started
    evaluation = sum(timer.phases.get(p, 0.0) for p in EVAL_PHASES)
    import fedtune

    write_json(out, {
        "fedtune_src": str(Path(fedtune.__file__).parent), "wall_seconds": wall, "evaluation_seconds": evaluation,
        "evaluation_share": evaluation / wall, "fit_seconds": timer.fit_seconds, "phase_seconds": timer.phases,
        "losses": result.comparison["summary"]["losses"], "rouge_l": {n: g["rouge_l"] for n, g in result.comparison["generation"].items()},
    })


def fresh_cache(folder: Path) -> Path:
    """A fedtune cache with no evaluations in it (a first compare, not a re-run) that shares the
    bundled model's one-time conversion with the user's cache (a user pays that once, not per compare)."""
    from fedtune.model.base import bundled_model_dir

    cache = folder / "cache"
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(bundled_model_dir().parent, target_is_directory=True)
    return cache


def run_compare(src: Path, folder: Path, rounds: int, extra: list[str]) -> dict:
    out = folder / "timing.json"
    overrides = [f"model.name={BUNDLED}", f"federation.rounds={rounds}", f"output.dir={folder / 'cmp'}", *extra]
    cmd = [sys.executable, "-m", "benchmarks.evaluation", "--child", str(out), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), "PYTHONPATH": f"{src}:{ROOT}", "FEDTUNE_CACHE": str(fresh_cache(folder))},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compare with {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def compare_before_after(before: str, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "before"
        old.mkdir()
        archive = subprocess.run(["git", "archive", before, "src"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        results = {"before": run_compare(old / "src", tmp / "b", rounds, [])}
        results["after"] = run_compare(ROOT / "src", tmp / "a", rounds, [])
    results["wall_speedup"] = results["before"]["wall_seconds"] / results["after"]["wall_seconds"]
    results["evaluation_speedup"] = results["before"]["evaluation_seconds"] / results["after"]["evaluation_seconds"]
    return {"before_revision": before, "rounds": rounds, **results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=2, help="federation.rounds of the compare (the recipe has 5)")
    p.add_argument("--before", default=BEFORE, help="git revision measured as 'before'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--skip-heldout", action="store_true")
    p.add_argument("--note", default="", help="measurement conditions (e.g. machine under load)")
    p.add_argument("--out", type=Path, default=RESULTS / "evaluation.json")
    args, rest = p.parse_known_args()
    if args.child is not None:
        compare_child(args.child, rest)
        return
    result = {"machine": {**machine(), "cpu_info": cpu()}, "note": args.note}
    if not args.skip_heldout:
        result["heldout"] = heldout_throughput(args.repeats)
        write_json(args.out, result)  # written as each part finishes
        print(json.dumps(result["heldout"], indent=1))
    if not args.skip_compare:
        result["compare"] = compare_before_after(args.before, args.rounds)
        result["targets"] = {"compare.after.evaluation_share": "<= 0.25"}
        print(json.dumps(result["compare"], indent=1))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
