"""What running on Flower costs per round, against the in-process engine on the same work.

    python -m benchmarks.flower_overhead                      # tiny model, 2 clients, 4 rounds (~5 min on 2 cores)
    python -m benchmarks.flower_overhead --model bundled      # SmolLM2-135M-Instruct
    python -m benchmarks.flower_overhead --engines inprocess,deployment --rounds 3

The same config and seed run on each engine: ``inprocess``; ``simulation`` (Flower's
simulation runtime, Ray actors that live for the run); ``deployment`` (a real
``flower-superlink`` and one ``flower-supernode`` per client on 127.0.0.1, started with
``flwr run``; Flower starts a new ClientApp process for every message). Every engine trains
the same clients on the same batches, so the difference in round wall time is what the
engine costs: message passing, process start-up, model loading. Both Flower runtimes train a
round's clients in parallel where in-process trains them one after another.

Per engine: each round's wall time (the round loop's own ``round`` record: fits, aggregation,
evaluation, checkpoint), the clients' training seconds inside ``LocalTrainer.fit``, the
ClientApp's model + data loading (``setup_seconds``, 0 when its process already held them),
and the whole run's wall time (start-up included). Ratios are per-round wall time against in-process
(round 1 apart: it carries Ray's actor start-up). Results go to
benchmarks/results/flower_overhead.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides(model: str, rounds: int, steps: int, out: Path) -> list[str]:
    return [
        f"model.name={model}", "data.demo_per_category=40", "data.max_length=96", "partition.method=shards",
        "partition.num_clients=2", "partition.holdout_per_category=3", f"federation.rounds={rounds}",
        f"train.local_steps={steps}", "train.batch_size=4", "train.lr=0.001", "eval.num_samples=0",
        "flower.client_cpus=1", "flower.connect_timeout=300", f"output.dir={out}", "output.overwrite=true",
    ]


def run_engine(engine: str, args_: list[str], workdir: Path) -> float:
    from fedtune.config import load_config
    from fedtune.federation.flower import simulation
    from fedtune.federation.flower.deploy import COMPLETED, flwr_run
    from fedtune.federation.flower.localnet import LocalDeployment
    from fedtune.federation.inprocess import run

    started = time.perf_counter()
    if engine == "inprocess":
        run(load_config(None, args_))
    elif engine == "simulation":
        simulation.run(load_config(None, args_ + ["federation.engine=flower"]))
    else:
        cfg = load_config(None, args_ + ["federation.engine=flower"])
        nodes = [{"partition-id": c} for c in range(cfg.partition.num_clients)]
        with LocalDeployment(workdir / "net", nodes) as net:
            status = flwr_run(cfg, net.superlink, insecure=True)
        if status["status"] != COMPLETED:
            raise SystemExit(f"deployment run ended {status['status']}: {status.get('status-details')}")
    return time.perf_counter() - started


def summarize(run_dir: Path, wall: float) -> dict:
    from fedtune.reporting.metrics import read_metrics

    lines = list(read_metrics(run_dir / "metrics.jsonl"))
    rounds = [r["seconds"] for r in lines if r["type"] == "round"]
    fits: dict[int, list[float]] = {}
    setups: dict[int, list[float]] = {}
    for r in lines:
        if r["type"] == "fit":
            fits.setdefault(r["round"], []).append(r["seconds"])
            setups.setdefault(r["round"], []).append(r.get("setup_seconds", 0.0))
    return {
        "run_seconds": wall,
        "round_seconds": rounds,
        "fit_seconds_sum": [sum(fits[r]) for r in sorted(fits)],
        "fit_seconds_max": [max(fits[r]) for r in sorted(fits)],
        "node_setup_seconds_max": [max(setups[r]) for r in sorted(setups)],  # model + data load in the ClientApp
        "round1_seconds": rounds[0],
        "later_round_seconds_mean": statistics.mean(rounds[1:]) if len(rounds) > 1 else None,
        "failures": sum(1 for r in lines if r["type"] == "failure"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama, built here), 'bundled' (SmolLM2-135M) or a path")
    parser.add_argument("--engines", default="inprocess,simulation,deployment")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "flower_overhead.json")
    args = parser.parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("FLWR_TELEMETRY_ENABLED", "0"),
                       ("FLWR_DISABLE_UPDATE_CHECK", "1")):
        os.environ.setdefault(key, value)

    with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
        tmp = Path(tmp)
        model = {"bundled": "smollm2-135m-instruct", "tiny": str(tmp / "tiny")}.get(args.model, args.model)
        if args.model == "tiny":
            sys.path.insert(0, str(ROOT))
            from fedtune.model.base import bundled_model_dir, load_tokenizer
            from tests.conftest import build_tiny_llama

            build_tiny_llama(tmp / "tiny", load_tokenizer(str(bundled_model_dir())))
        results = {}
        for engine in args.engines.split(","):
            run_dir = tmp / engine
            wall = run_engine(engine, overrides(model, args.rounds, args.steps, run_dir), tmp / f"{engine}-work")
            results[engine] = summarize(run_dir, wall)
            print(f"{engine:>11}: run {wall:6.1f}s, rounds {[round(s, 1) for s in results[engine]['round_seconds']]}", flush=True)

    base = results.get("inprocess")
    ratios = {}
    if base:
        for engine, r in results.items():
            ratios[engine] = {
                "round1": r["round1_seconds"] / base["round1_seconds"],
                "later_rounds": (r["later_round_seconds_mean"] / base["later_round_seconds_mean"]) if base["later_round_seconds_mean"] else None,
                "later_round_overhead_seconds": (r["later_round_seconds_mean"] - base["later_round_seconds_mean"]) if base["later_round_seconds_mean"] else None,
                "run": r["run_seconds"] / base["run_seconds"],
            }
    report = {
        "benchmark": "flower_overhead",
        "command": " ".join(["python -m benchmarks.flower_overhead", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "flwr": __import__("flwr").__version__,
        "model": args.model, "clients": 2, "clients_per_round": 2, "rounds": args.rounds, "local_steps": args.steps,
        "engines": results, "ratio_to_inprocess": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for engine, r in ratios.items():
        print(f"{engine:>11}: later rounds x{r['later_rounds']:.2f} ({r['later_round_overhead_seconds']:+.1f}s/round), "
              f"round 1 x{r['round1']:.2f}, whole run x{r['run']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
