"""Communication: bytes a client uploads per round, with and without update compression,
and what compression costs in held-out loss after the same rounds (same data, partition,
seed and steps; only ``compression.*`` differs). The baseline is the float32 upload of the
same run.

    python -m benchmarks.communication            # bundled model
    python -m benchmarks.communication --quick    # tiny model
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, bench_model, machine, write_json

SETTINGS = {  # name -> compression.* overrides
    "fp32": ["compression.method=none"],
    "int8": ["compression.method=int8"],
    "int4": ["compression.method=int4"],
    "topk10": ["compression.method=topk", "compression.topk_fraction=0.1"],
    "topk10-no-ef": ["compression.method=topk", "compression.topk_fraction=0.1", "compression.error_feedback=false"],
}


def run_once(model: str, work: Path, name: str, quick: bool) -> dict:
    from fedtune.config import load_config
    from fedtune.federation.inprocess import run
    from fedtune.reporting.metrics import read_metrics

    cfg = load_config(None, [
        f"model.name={model}", "data.path=demo", "data.max_length=128", "data.demo_per_category=40",
        "partition.method=shards", "partition.num_clients=10", "partition.holdout_per_category=3",
        "federation.rounds=3", "federation.clients_per_round=3", f"train.local_steps={3 if quick else 6}",
        "train.batch_size=4", "train.lr=3e-4", "eval.num_samples=0", "output.report=false",
        f"output.dir={work / name}", *SETTINGS[name],
    ])
    result = run(cfg)
    fits = [r for r in read_metrics(Path(cfg.output.dir) / "metrics.jsonl") if r["type"] == "fit"]
    sent = sum(f["upload_bytes"] for f in fits) / len(fits)
    dense = sum(f["upload_bytes_fp32"] for f in fits) / len(fits)
    return {"bytes_per_client_round": sent, "fp32_bytes_per_client_round": dense, "ratio": dense / sent,
            "heldout_loss": result.final_eval["loss"], "initial_loss": result.initial_eval["loss"]}


def measure(quick: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fedtune-comm-"))
    try:
        model = bench_model(quick, work)
        runs = {}
        for name in SETTINGS:
            print(f"  communication: {name}", flush=True)
            runs[name] = run_once(model, work, name, quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = runs["fp32"]["heldout_loss"]
    for r in runs.values():
        r["loss_change"] = (r["heldout_loss"] - base) / base  # + is worse
    ok = [r["ratio"] for r in runs.values() if r["loss_change"] <= 0.01]
    return {
        "benchmark": "communication",
        "model": "tiny" if quick else model,
        "runs": runs,
        "best_ratio_within_1pct": max(ok),
        "target": ">= 4x fewer bytes, held-out loss within 1%",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = {"machine": machine(), **measure(args.quick)}
    out = write_json(args.out or RESULTS / ("communication-quick.json" if args.quick else "communication.json"), result)
    print(f"{'setting':<14} {'bytes/client/round':>18} {'ratio':>7} {'held-out loss':>13} {'change':>8}")
    for name, r in result["runs"].items():
        print(f"{name:<14} {r['bytes_per_client_round']:>18,.0f} {r['ratio']:>7.2f} {r['heldout_loss']:>13.4f} {r['loss_change']:>+8.2%}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
