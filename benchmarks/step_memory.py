"""Peak RSS and step time of fedtune's SFT step on 1,024-token packed micro-batches, per option.

Each option runs in a fresh process (its own peak RSS): the bundled SmolLM2-135M with the
default LoRA, ``steps`` optimizer steps of four 256-token examples packed into one row (the
throughput workload's largest micro-batch), after one warm-up step. Options:

- ``fp32`` / ``bf16``: train.precision;
- ``nocache``: bf16 autocast with ``cache_enabled=False``;
- ``malloc``: the CLI's process settings (``fedtune.native_memory.tune``: glibc with two arenas and a fixed mmap threshold, kernel caches capped);
- ``half``: two 512-token micro-batches per step (train.max_batch_tokens=512);
- ``tNNN`` (e.g. ``t384``): the step's 1,024 tokens as eight 128-token examples, packed into
  micro-batches of at most NNN tokens (train.max_batch_tokens=NNN);
- ``keep``: the LoRA layers keep their inputs for backward instead of computing them again
  (model/activations.py ``Recompute``), as before that change;
- ``onednn``: ONEDNN_PRIMITIVE_CACHE_CAPACITY=8;
- ``compile``: train.compile=true.

    python -m benchmarks.step_memory --options fp32 bf16 bf16+malloc
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, peak_rss_mb, run_child, write_json

MODULE = "benchmarks.step_memory"


def child(option: str, steps: int) -> dict:
    import torch

    import os

    parts = set(option.split("+"))
    if "onednn" in parts:  # before torch loads oneDNN
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "8"
    if "malloc" in parts:
        from fedtune.native_memory import bound_kernel_caches, tune

        tune()
        bound_kernel_caches()
    from fedtune.config import load_config
    from fedtune.data.prompts import Encoded
    from fedtune.federation import setup

    precision = "fp32" if "fp32" in parts else "bf16"
    over = [f"train.precision={precision}", "model.name=smollm2-135m-instruct", "train.batch_size=4"]
    if "compile" in parts:
        over.append("train.compile=true")
    cfg = load_config(None, over)
    bundle = setup.build_model(cfg)
    trainer = setup.build_trainer(cfg, bundle)
    if "keep" in parts:
        import fedtune.model.lora_dropout as lora_dropout

        lora_dropout.recipe_of = lambda t: (None, ())
    if "nocache" in parts:
        trainer.optimizer.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    loaded = peak_rss_mb()
    gen = torch.Generator().manual_seed(0)

    budget = next((int(p[1:]) for p in parts if p[:1] == "t" and p[1:].isdigit()), None)
    if budget is not None and budget < 128:
        raise SystemExit(f"option t{budget}: the budget must hold one 128-token example; use t128 or more")
    examples, length = (8, 128) if budget else (4, 256)
    # half: train.max_batch_tokens=512, two micro-batches per step; tNNN: NNN // 128 examples per micro-batch
    per_micro = budget // length if budget else 2 if "half" in parts else 4

    def batches_of(length: int) -> tuple[list[dict], int]:
        items = [Encoded(torch.randint(0, 49000, (length,), generator=gen), length // 4) for _ in range(examples)]
        batches = [trainer.make_batch(items[i : i + per_micro]) for i in range(0, examples, per_micro)]
        return batches, sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    trainer.model.train()
    trainer._step(*batches_of(length), 1e-4)  # warm-up (first-call allocations, compilation)
    warm = peak_rss_mb()
    times, tokens = [], 0
    for s in range(steps):  # packed rows differ in length from step to step, as in a real fit
        batches, labelled = batches_of(length - length // 28 * (s + 1))
        t = time.perf_counter()
        trainer._step(batches, labelled, 1e-4)
        times.append(time.perf_counter() - t)
        tokens += sum(b["input_ids"].numel() for b in batches)
    return {"option": option, "precision": bundle.precision, "rss_after_load_mb": loaded, "peak_rss_after_first_step_mb": warm,
            "peak_rss_mb": peak_rss_mb(), "step_seconds": sorted(times)[len(times) // 2], "tokens_per_s": tokens / sum(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--options", nargs="+", default=["fp32", "bf16", "bf16+malloc", "bf16+nocache"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="interleaved A/B repeats (median step time)")
    p.add_argument("--child")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.child:
        write_json(args.out, child(args.child, args.steps))
        return
    work = Path(tempfile.mkdtemp(prefix="fedtune-stepmem-"))
    runs: dict[str, list[dict]] = {o: [] for o in args.options}
    try:
        for r in range(args.repeats):
            for o in args.options:
                runs[o].append(run_child(MODULE, ["--child", o, "--steps", str(args.steps)], work / f"{o}-{r}.json"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = {}
    for o, rs in runs.items():
        times = sorted(x["step_seconds"] for x in rs)
        table[o] = {"peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "rss_after_load_mb": rs[0]["rss_after_load_mb"],
                    "peak_rss_after_first_step_mb": max(x["peak_rss_after_first_step_mb"] for x in rs),
                    "median_tokens_per_s": sorted(x["tokens_per_s"] for x in rs)[len(rs) // 2],
                    "median_step_seconds": times[len(times) // 2], "precision": rs[0]["precision"]}
    result = {"machine": machine(), "benchmark": "step_memory", "model": "smollm2-135m-instruct",
              "note": "2 shared cores under load from other processes: compare step times within this run only", "options": table}
    write_json(args.out or RESULTS / "step_memory.json", result)
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
