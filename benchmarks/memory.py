"""Memory in the number of clients: peak RSS of the same run with 1,000 clients and with 10
(same clients per round, same steps), each in a fresh process. Flat is the goal: nothing
per client may live in RAM for every client at once.

    python -m benchmarks.memory                 # bundled model
    python -m benchmarks.memory --quick         # tiny model
    python -m benchmarks.memory --strategy scaffold   # with per-client state
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, bench_model, machine, peak_rss_mb, run_child, write_json

MODULE = "benchmarks.memory"


def child(args) -> dict:
    from fedtune.config import load_config
    from fedtune.federation.inprocess import run

    cfg = load_config(None, [
        f"model.name={args.model}", "data.path=demo", "data.max_length=96",
        "partition.method=iid", f"partition.num_clients={args.clients}", "partition.holdout_per_category=1",
        "federation.rounds=3", "federation.clients_per_round=3", "train.local_steps=2", "train.batch_size=2",
        f"strategy.name={args.strategy}", "eval.num_samples=0", f"output.dir={args.work}/run-{args.clients}",
    ])
    result = run(cfg)
    return {"clients": args.clients, "rounds": result.rounds_done, "peak_rss_mb": peak_rss_mb()}


def measure(quick: bool = False, strategy: str = "fedavg") -> dict:
    work = Path(tempfile.mkdtemp(prefix="fedtune-mem-"))
    try:
        model = bench_model(quick, work)
        runs = {
            n: run_child(MODULE, ["--child", "--clients", str(n), "--model", model, "--work", str(work), "--strategy", strategy], work / f"{n}.json")
            for n in (10, 1000)
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "memory",
        "model": "tiny" if quick else model,
        "strategy": strategy,
        "peak_rss_mb_10_clients": runs[10]["peak_rss_mb"],
        "peak_rss_mb_1000_clients": runs[1000]["peak_rss_mb"],
        "ratio": runs[1000]["peak_rss_mb"] / runs[10]["peak_rss_mb"],
        "target": "<= 1.2",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--child", action="store_true")
    p.add_argument("--clients", type=int)
    p.add_argument("--model")
    p.add_argument("--work")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.child:
        write_json(args.out, child(args))
        return
    result = {"machine": machine(), **measure(args.quick, args.strategy)}
    name = f"memory-{args.strategy}" + ("-quick" if args.quick else "")
    write_json(args.out or RESULTS / f"{name}.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
