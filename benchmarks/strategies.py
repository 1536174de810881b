"""Every strategy and robust aggregator on the same non-IID federation: held-out loss per round.

    python -m benchmarks.strategies                  # bundled SmolLM2, about 30 min on 2 CPU cores
    python -m benchmarks.strategies --quick          # a few seconds per entry: a smoke check
    python -m benchmarks.strategies --model PATH --only fedavg,scaffold

Each entry is a recipe from configs/ (its strategy settings) run with the same data,
category-shard partition, seed, client schedule and training budget (forced by the same
overrides), so only the strategy differs. Writes ``strategies.json`` (every number),
``strategies.md`` (the table) and ``strategies.png`` (held-out loss per round) under
benchmarks/results/ (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# (entry name, recipe, extra overrides)
ENTRIES = [
    ("fedavg", "demo.yaml", []),
    ("fedavgm", "fedavgm.yaml", []),
    ("fedprox", "fedprox.yaml", []),
    ("scaffold", "scaffold.yaml", []),
    ("fedadagrad", "fedadagrad.yaml", []),
    ("fedadam", "fedadam.yaml", []),
    ("fedyogi", "fedyogi.yaml", []),
    ("fedavg+median", "median.yaml", []),
    ("fedavg+trimmed_mean", "trimmed-mean.yaml", ["strategy.trim_beta=0.2"]),  # 5 clients: one dropped per end
    ("fedavg+krum", "krum.yaml", ["strategy.aggregator=krum"]),
    ("fedavg+multikrum", "krum.yaml", []),
]

# The same federation for every entry: 10 clients with 2 category shards each (non-IID),
# 5 of them per round (Krum with f = 1 needs at least 5), no dropout.
COMMON = [
    "seed=0",
    "data.path=demo",
    "data.demo_per_category=100",
    "data.max_length=128",
    "partition.method=shards",
    "partition.num_clients=10",
    "partition.shards_per_client=2",
    "partition.holdout_per_category=5",
    "federation.rounds=5",
    "federation.clients_per_round=5",
    "federation.sampling=uniform",
    "federation.dropout=0.0",
    "federation.min_clients=1",
    "train.local_steps=3",
    "train.batch_size=4",
    "train.lr=1e-3",
    "train.lr_schedule=constant",
    "train.warmup_steps=0",
    "eval.every=1",
    "eval.num_samples=0",
    "output.overwrite=true",
]
QUICK = ["data.demo_per_category=12", "data.max_length=64", "partition.holdout_per_category=1", "federation.rounds=2", "train.local_steps=1"]


def run_entry(name: str, recipe: str, extra: list[str], overrides: list[str], runs: Path) -> dict:
    from fedtune.config import load_config
    from fedtune.federation.inprocess import run
    from fedtune.reporting.metrics import read_metrics

    cfg = load_config(CONFIGS / recipe, overrides + extra + [f"output.dir={runs / name}"])
    started = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - started
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["type"] == "eval"]
    s = cfg.strategy
    params = {k: v for k, v in vars(s).items() if v is not None and k not in ("name", "aggregator")}
    return {
        "name": name, "recipe": f"configs/{recipe}", "strategy": s.name, "aggregator": s.aggregator, "params": params,
        "rounds": [e["round"] for e in evals], "heldout_loss": [e["loss"] for e in evals],
        "final_loss": evals[-1]["loss"], "best_loss": min(e["loss"] for e in evals), "seconds": seconds,
    }


def table(entries: list[dict]) -> str:
    """Markdown: held-out loss per round, and the change from round 0, per entry."""
    rounds = entries[0]["rounds"]
    head = "| strategy | " + " | ".join(f"r{r}" for r in rounds) + " | change | seconds |"
    lines = [head, "|" + "---|" * (len(rounds) + 3)]
    for e in entries:
        losses = " | ".join(f"{x:.4f}" for x in e["heldout_loss"])
        lines.append(f"| {e['name']} | {losses} | {e['final_loss'] - e['heldout_loss'][0]:+.4f} | {e['seconds']:.0f} |")
    return "\n".join(lines)


def plot(entries: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for e in entries:
        style = "--" if e["aggregator"] != "mean" else "-"
        ax.plot(e["rounds"], e["heldout_loss"], style, marker="o", markersize=3, label=e["name"])
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss (nats per response token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (2 rounds, 1 local step): a smoke check")
    parser.add_argument("--model", default=None, help="base model (default: each recipe's, the bundled SmolLM2)")
    parser.add_argument("--only", default=None, help="comma-separated entry names to run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the results")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "benchmarks" / "strategies", help="folder for the run directories")
    args = parser.parse_args(argv)

    overrides = COMMON + (QUICK if args.quick else []) + ([f"model.name={args.model}"] if args.model else [])
    chosen = [e for e in ENTRIES if args.only is None or e[0] in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, recipe, extra in chosen:
        entries.append(run_entry(name, recipe, extra, overrides, args.runs))
        print(f"{name}: held-out loss {' '.join(f'{x:.4f}' for x in entries[-1]['heldout_loss'])} "
              f"({entries[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)

    stem = "strategies-quick" if args.quick else "strategies"
    results = {
        "benchmark": "strategies", "command": "python -m benchmarks.strategies " + " ".join(argv if argv is not None else sys.argv[1:]),
        "overrides": overrides, "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "entries": entries,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem}.md").write_text(table(entries) + "\n")
    plot(entries, args.out / f"{stem}.png", "held-out loss per round, same non-IID federation (10 clients, 2 category shards each)")
    print(table(entries))
    return results


if __name__ == "__main__":
    main()
