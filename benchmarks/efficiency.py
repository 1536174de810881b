"""Federation efficiency: what does federating cost on top of the optimizer steps?

Baseline: a plain PyTorch + peft loop that loads the model once and performs exactly the
optimizer steps of the federated run — the same batches in the same order, the same loss
function and optimizer — with no federation around them (no adapter swaps, aggregation,
checkpoints or metric logging). fedtune: the in-process engine's round loop on the same
config. Held-out evaluation is timed separately and excluded from both (the plain loop
has none). The figure is baseline seconds / fedtune seconds (1.0 = no overhead), in one
process, alternating the two to spread machine noise; the best of ``repeats`` is used.

    python -m benchmarks.efficiency            # SmolLM2-135M on the demo data
    python -m benchmarks.efficiency --quick    # tiny model: milliseconds per step, where fixed costs show
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine, training_clock, write_json


def config(model: str, run_dir: Path, quick: bool):
    from fedtune.config import load_config

    return load_config(None, [
        f"model.name={model}", "data.path=demo", f"data.demo_per_category={60 if quick else 100}", "data.max_length=128",
        "partition.method=shards", "partition.num_clients=10", "partition.holdout_per_category=2",
        f"federation.rounds={8 if quick else 3}", "federation.clients_per_round=3",
        f"train.local_steps={20 if quick else 6}", "train.batch_size=4", "train.lr=3e-4", "lora.dropout=0.0",
        f"eval.every={8 if quick else 3}", "eval.num_samples=0", f"output.dir={run_dir}", "output.overwrite=true",
    ])


def fedtune_seconds(cfg) -> tuple[float, int]:
    """Wall time of the round loop minus the held-out evaluations inside it."""
    from fedtune.federation import inprocess

    with training_clock() as clock:
        result = inprocess.run(cfg)
    steps = sum(1 for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"type": "fit"' in line)
    return clock["train_seconds"], steps


def plain_seconds(cfg) -> tuple[float, int]:
    """The same optimizer steps in a plain loop: model loaded once, one adapter, one AdamW."""
    from fedtune.federation import setup
    from fedtune.model.forward import sequence_nll
    from fedtune.seeding import generator
    from fedtune.server.sampling import clients_per_round, sample_clients

    examples, _ = setup.load_data(cfg)
    partition = setup.make_partition(cfg, examples)
    bundle = setup.build_model(cfg)
    encoded = setup.encode_examples(bundle.tokenizer, examples, cfg.data.template, cfg.data.max_length)
    trainer = setup.build_trainer(cfg, bundle)  # only to plan the identical batches
    shards = [[encoded[i] for i in s] for s in partition.shards]
    k = clients_per_round(len(shards), cfg.federation.clients_per_round, cfg.federation.fraction)
    work = []  # every optimizer step of the run: (client shard, micro-batches of positions)
    for rnd in range(1, cfg.federation.rounds + 1):
        for cid in sample_clients(len(shards), k, generator(cfg.seed, "sampling", rnd)):
            work.extend((shards[cid], step) for step in trainer.plan(cid, rnd, shards[cid]))
    model, params = bundle.model, list(bundle.params.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    model.train()
    started = time.perf_counter()
    for shard, step in work:
        batches = [trainer.make_batch([shard[j] for j in micro]) for micro in step]  # packed or padded, as fedtune's
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            nll, _ = sequence_nll(model, **b)
            (nll.sum() / max(tokens, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, len(work)


def measure(quick: bool = False, repeats: int = 2, model: str | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fedtune-eff-"))
    try:
        if model is None and quick:
            from benchmarks.throughput import tiny_model

            model = str(tiny_model(work / "tiny"))
        model = model or "smollm2-135m-instruct"
        cfg = config(model, work / "run", quick)
        plain, fed = [], []
        for _ in range(repeats):
            plain.append(plain_seconds(cfg)[0])
            fed.append(fedtune_seconds(cfg)[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "efficiency",
        "model": "tiny" if quick else model,
        "rounds": cfg.federation.rounds, "clients_per_round": cfg.federation.clients_per_round,
        "local_steps": cfg.train.local_steps,
        "plain_seconds": plain, "fedtune_seconds": fed,
        "efficiency": min(plain) / min(fed),
        "target": ">= 0.9 (tiny model)" if quick else ">= 0.98 (bundled model)",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = {"machine": machine(), **measure(args.quick, args.repeats)}
    write_json(args.out or RESULTS / ("efficiency-quick.json" if args.quick else "efficiency.json"), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
