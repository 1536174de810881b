"""What running on Flower costs per round, against the in-process engine on the same work.

    python -m benchmarks.flower_overhead                      # tiny model, 2 clients, 4 rounds (~5 min on 2 cores)
    python -m benchmarks.flower_overhead --model bundled      # SmolLM2-135M-Instruct
    python -m benchmarks.flower_overhead --engines inprocess,deployment --rounds 3

The same config and seed run on each engine: ``inprocess``; ``simulation`` (Flower's
simulation runtime, Ray actors that live for the run); ``deployment`` (a real
``flower-superlink`` and one ``flower-supernode`` per client on 127.0.0.1, started with
``flwr run``; each SuperNode runs with ``--isolation process`` beside one long-lived
``fedtune flower worker`` that runs all its messages, as LocalDeployment starts it). Every engine trains
the same clients on the same batches, so the difference in round wall time is what the
engine costs: message passing, process start-up, model loading. Both Flower runtimes train a
round's clients in parallel where in-process trains them one after another.

Per engine: each round's wall time (the round loop's own ``round`` record: fits, aggregation,
evaluation, checkpoint), the clients' training seconds inside ``LocalTrainer.fit``, the
ClientApp's model + data loading (``setup_seconds``, 0 when its process already held them),
and the whole run's wall time (start-up included). Ratios are per-round wall time against in-process
(round 1 apart: it carries Ray's actor start-up). Results go to
benchmarks/results/flower_overhead.json (or ``--out``).

``breakdown`` per engine says where the time goes (see :func:`breakdown`): the ClientApp's
process start-up before its handler ran, model load, data load, tokenisation (or a read of
the node's tokenised-shard cache), training, its torch threads; and per round the slowest
node's share against the rest (messages, polling, aggregation, evaluation, checkpoint).
``machine.cpu`` has the CPU model, its flags and the load average when the run started: on
a shared machine the wall times are noisy, and only ratios measured within one run compare.
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
        # the same work on every engine: eval.federated=auto turns federated evaluation on in a deployment only
        # (an evaluate message per node and round, and each client's own rows held out of training)
        "eval.federated=false",
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


NODE_PARTS = ("process_age", "model_load", "data_load", "tokenise")  # <part>_seconds in a Flower fit's metrics


def summarize(run_dir: Path, wall: float) -> dict:
    from fedtune.reporting.metrics import read_metrics

    lines = list(read_metrics(run_dir / "metrics.jsonl"))
    rounds = [r["seconds"] for r in lines if r["type"] == "round"]
    fits: dict[int, list[dict]] = {}
    for r in lines:
        if r["type"] == "fit":
            fits.setdefault(r["round"], []).append(r)
    order = sorted(fits)
    return {
        "run_seconds": wall,
        "round_seconds": rounds,
        "fit_seconds_sum": [sum(f["seconds"] for f in fits[r]) for r in order],
        "fit_seconds_max": [max(f["seconds"] for f in fits[r]) for r in order],
        "node_setup_seconds_max": [max(f.get("setup_seconds", 0.0) for f in fits[r]) for r in order],  # model + data load in the ClientApp
        "round1_seconds": rounds[0],
        "later_round_seconds_mean": statistics.mean(rounds[1:]) if len(rounds) > 1 else None,
        "failures": sum(1 for r in lines if r["type"] == "failure"),
        "breakdown": breakdown(fits, rounds),
    }


def breakdown(fits: dict[int, list[dict]], rounds: list[float]) -> dict:
    """Where a round's time goes. Per fit (means over every client fit): ``train`` (inside
    LocalTrainer.fit), and on Flower the ClientApp's ``process_age`` (the process's life before
    the handler ran: Python start, imports, Flower's start-up; counted as start-up only in a
    call that also loaded the model, i.e. a fresh process), ``model_load``, ``data_load``, ``tokenise`` (0 where cached). Per round:
    ``node_critical`` (in-process: the clients' fits one after another; Flower: the slowest
    client's process start-up + setup + train, when they run in parallel) and ``outside_nodes``
    (the rest of the round: messages, polling, serialisation, aggregation, evaluation, checkpoint)."""
    all_fits = [f for r in sorted(fits) for f in fits[r]]
    first = fits[min(fits)] if fits else []

    def mean(key: str, among=all_fits) -> float:
        return statistics.mean(f.get(key, 0.0) for f in among) if among else 0.0

    flower = any("process_age_seconds" in f for f in all_fits)

    def node_seconds(f: dict) -> float:  # a fresh process (it loaded the model in this call) also paid its start-up
        return f.get("setup_seconds", 0.0) + f["seconds"] + (f.get("process_age_seconds", 0.0) if f.get("model_load_seconds") else 0.0)

    critical = [max(map(node_seconds, fits[r])) if flower else sum(f["seconds"] for f in fits[r]) for r in sorted(fits)]
    return {
        "first_fit_setup_seconds": max((f.get("setup_seconds", 0.0) for f in first), default=0.0),
        "train_seconds_per_fit": mean("seconds"),
        **{f"{part}_seconds_per_fit": mean(f"{part}_seconds") for part in NODE_PARTS},
        "setup_seconds_per_fit": mean("setup_seconds"),
        "model_loads": sum(1 for f in all_fits if f.get("model_load_seconds")),
        "shard_tokenised": sum(1 for f in all_fits if "tokenise_seconds" in f and f.get("shard_disk_hits", 0) == 0),
        "shard_from_disk": sum(1 for f in all_fits if "tokenise_seconds" in f and f.get("shard_disk_hits", 0) > 0),
        "torch_threads": sorted({int(f["torch_threads"]) for f in all_fits if "torch_threads" in f}),
        "node_critical_seconds": critical,
        "outside_nodes_seconds": [r - c for r, c in zip(rounds, critical)],
    }


def cpu_info() -> dict:
    """CPU model and flags (what decides the matmul kernels), and the load when measured."""
    info = {"model": platform.processor() or None, "flags": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and info["model"] in (None, "", "x86_64"):
                info["model"] = value.strip()
            elif key.strip() == "flags" and not info["flags"]:
                info["flags"] = value.split()
    except OSError:
        pass
    info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in info["flags"]]
    info["loadavg_1_5_15"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


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

    cpu_before = cpu_info()
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
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "cpu": cpu_before, "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                    # OpenMP's spinning waits: with OMP_WAIT_POLICY=PASSIVE a loaded machine slows two-thread torch far less
                    "threading_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}},
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
