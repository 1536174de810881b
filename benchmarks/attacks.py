"""Malicious clients against FedAvg's mean and the robust aggregators, and the cost of DP.

    python -m benchmarks.attacks                 # bundled SmolLM2-135M, ~25 min on 2 CPU cores
    python -m benchmarks.attacks --quick         # a random 2-layer Llama: a smoke check in ~2 min
    python -m benchmarks.attacks --only mean,median --fractions 0,0.3

Every entry is the same federation (demo data, 10 clients with 2 category shards each, all 10
per round so that Krum with f=3 works, same seed, schedule and step budget); only the
attackers (``attack.fraction`` of the clients send ``-scale x`` their honest delta, a boosted
sign flip) and the server's aggregator differ. Server-side validation stays on as in every
run (its norm bound, 10 x the median, does not catch a 4 x flip). Then FedAvg without
attackers under central DP at two noise multipliers, with the clip norm C set to the median
honest update norm measured in the no-attack FedAvg entry. Writes ``attacks.json`` (every
number), ``attacks.md`` (the table) and ``attacks.png`` under benchmarks/results/ (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

AGGREGATORS = {  # name -> overrides (f = 3 and beta = 0.3 tolerate the 30% attackers of 10)
    "mean": ["strategy.aggregator=mean"],
    "median": ["strategy.aggregator=median"],
    "trimmed_mean": ["strategy.aggregator=trimmed_mean", "strategy.trim_beta=0.3"],
    "krum": ["strategy.aggregator=krum", "strategy.krum_f=3"],
}
FRACTIONS = (0.0, 0.1, 0.3)
NOISE = (0.3, 1.0)  # DP noise multipliers z

COMMON = [
    "seed=0", "data.path=demo", "data.demo_per_category=40", "data.max_length=128", "partition.method=shards",
    "partition.num_clients=10", "partition.shards_per_client=2", "partition.holdout_per_category=4",
    "federation.rounds=2", "federation.clients_per_round=10", "federation.min_clients=1", "train.local_steps=2",
    "train.batch_size=4", "train.lr=1e-3", "eval.num_samples=0", "output.report=false", "output.overwrite=true",
]
QUICK = ["data.demo_per_category=12", "data.max_length=64", "partition.holdout_per_category=2", "federation.rounds=2",
         "train.local_steps=2", "train.lr=3e-3"]


def run_entry(name: str, overrides: list[str], runs: Path) -> dict:
    from fedtune.config import load_config
    from fedtune.federation.inprocess import run
    from fedtune.reporting.metrics import read_metrics

    cfg = load_config(None, overrides + [f"output.dir={runs / name}"])
    started = time.perf_counter()
    run(cfg)
    seconds = time.perf_counter() - started
    records = list(read_metrics(runs / name / "metrics.jsonl"))
    evals = [r for r in records if r["type"] == "eval"]
    fits = [r for r in records if r["type"] == "fit"]
    return {
        "name": name, "aggregator": cfg.strategy.aggregator, "attack_fraction": cfg.attack.fraction,
        "attack": f"{cfg.attack.kind} x{cfg.attack.scale}" if cfg.attack.fraction else None,
        "dp": None if cfg.privacy.dp == "off" else {"mode": cfg.privacy.dp, "clip_norm": cfg.privacy.clip_norm,
                                                     "noise_multiplier": cfg.privacy.noise_multiplier, "delta": cfg.privacy.delta},
        "rounds": [e["round"] for e in evals], "heldout_loss": [e["loss"] for e in evals],
        "epsilon": [e.get("epsilon") for e in evals], "final_loss": evals[-1]["loss"],
        "honest_norms": [f["norm"] for f in fits if not f.get("malicious") and f.get("norm") is not None],
        "rejected": sum(1 for r in records if r["type"] == "rejected"), "seconds": seconds,
    }


def table(entries: list[dict]) -> str:
    """Markdown: final held-out loss per aggregator (rows) and attacker share (columns), then DP."""
    base = entries[0]["heldout_loss"][0]
    fractions = sorted({e["attack_fraction"] for e in entries if e["dp"] is None})
    lines = [f"held-out loss after {entries[0]['rounds'][-1]} rounds (round 0: {base:.4f}); "
             f"attackers send {entries[-1].get('attack_desc', 'a boosted sign flip')}", "",
             "| aggregator | " + " | ".join(f"{f:.0%} attackers" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for agg in dict.fromkeys(e["aggregator"] for e in entries if e["dp"] is None):
        cells = {e["attack_fraction"]: e for e in entries if e["dp"] is None and e["aggregator"] == agg}
        lines.append(f"| {agg} | " + " | ".join(f"{cells[f]['final_loss']:.4f}" if f in cells else "" for f in fractions) + " |")
    private = [e for e in entries if e["dp"] is not None]
    if private:
        lines += ["", "| FedAvg, no attackers | clip norm C | noise multiplier z | epsilon (delta=1e-5) | held-out loss |", "|---|---|---|---|---|"]
        plain = next((e for e in entries if e["dp"] is None and e["aggregator"] == "mean" and e["attack_fraction"] == 0), None)
        if plain:
            lines.append(f"| no DP | - | - | - | {plain['final_loss']:.4f} |")
        for e in private:
            lines.append(f"| central DP | {e['dp']['clip_norm']:.4g} | {e['dp']['noise_multiplier']:g} | {e['epsilon'][-1]:.2f} | {e['final_loss']:.4f} |")
    return "\n".join(lines)


def plot(entries: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    robust = [e for e in entries if e["dp"] is None]
    aggs = list(dict.fromkeys(e["aggregator"] for e in robust))
    fractions = sorted({e["attack_fraction"] for e in robust})
    width = 0.8 / len(fractions)
    for j, f in enumerate(fractions):
        ys = [next((e["final_loss"] for e in robust if e["aggregator"] == a and e["attack_fraction"] == f), float("nan")) for a in aggs]
        left.bar([i + j * width for i in range(len(aggs))], ys, width, label=f"{f:.0%} attackers")
    left.axhline(entries[0]["heldout_loss"][0], color="gray", linestyle="--", linewidth=1, label="round 0")
    left.set_xticks([i + width * (len(fractions) - 1) / 2 for i in range(len(aggs))], aggs)
    left.set_ylabel("held-out loss after the last round")
    left.set_ylim(bottom=min(e["final_loss"] for e in robust) * 0.98)
    left.legend(fontsize=8)
    left.set_title("aggregators under sign-flip attackers")
    for e in [e for e in entries if e["dp"] is None and e["aggregator"] == "mean" and e["attack_fraction"] == 0] + [e for e in entries if e["dp"]]:
        label = "FedAvg, no DP" if e["dp"] is None else f"DP z={e['dp']['noise_multiplier']:g}, eps={e['epsilon'][-1]:.1f}"
        right.plot(e["rounds"], e["heldout_loss"], marker="o", label=label)
    right.set_xticks(entries[0]["rounds"])
    right.set_xlabel("round")
    right.set_ylabel("held-out loss")
    right.set_title("central DP (no attackers)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from fedtune.model.base import bundled_model_dir, load_tokenizer
    from tests.conftest import build_tiny_llama

    return str(build_tiny_llama(folder, load_tokenizer(str(bundled_model_dir()))))


def add_dp(entries: list[dict], add) -> None:
    """FedAvg without attackers under central DP at each of NOISE, C = the median honest update norm."""
    plain = next((e for e in entries if e["aggregator"] == "mean" and e["attack_fraction"] == 0), None)
    if plain is None:  # the clip norm comes from the honest FedAvg run
        add("mean-0", [])
        plain = entries[-1]
    clip = statistics.median(plain["honest_norms"])
    for z in NOISE:
        add(f"dp-z{z:g}", ["privacy.dp=central", f"privacy.clip_norm={clip:.6g}", f"privacy.noise_multiplier={z}"])


def write(entries: list[dict], args, common: list[str], model, stem: str) -> dict:
    for e in entries:
        e["attack_desc"] = f"-{args.scale:g} x their honest delta (sign_flip, attack.scale={args.scale:g})"
    results = {
        "benchmark": "attacks", "command": "python -m benchmarks.attacks " + " ".join(sys.argv[1:]),
        "model": model or "smollm2-135m-instruct", "overrides": common, "entries": entries,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem}.md").write_text(table(entries) + "\n")
    plot(entries, args.out / f"{stem}.png", f"10 clients, all per round, {entries[0]['rounds'][-1]} rounds "
         f"({'tiny random model' if args.quick else 'SmolLM2-135M'}, demo data)")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a random 2-layer Llama with tiny data: a smoke check")
    parser.add_argument("--model", default=None, help="base model (default: the bundled SmolLM2-135M)")
    parser.add_argument("--only", default=None, help="comma-separated aggregators (and/or 'dp') to run")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="attacker shares, e.g. 0,0.1,0.3")
    parser.add_argument("--scale", type=float, default=4.0, help="attackers send -scale x their honest delta")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the results")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "benchmarks" / "attacks", help="folder for the run directories")
    args = parser.parse_args(argv)

    model = args.model or (tiny_model(Path(tempfile.mkdtemp()) / "tiny") if args.quick else None)
    common = COMMON + (QUICK if args.quick else []) + ([f"model.name={model}"] if model else [])
    only = None if args.only is None else set(args.only.split(","))
    stem = "attacks-quick" if args.quick else "attacks"
    entries: list[dict] = []

    def add(name: str, overrides: list[str]) -> None:  # results are rewritten after every entry: a cut run keeps its table
        entries.append(run_entry(name, common + overrides, args.runs))
        e = entries[-1]
        print(f"{name}: held-out loss {' '.join(f'{x:.4f}' for x in e['heldout_loss'])}, {e['rejected']} rejected "
              f"({e['seconds']:.0f} s)", file=sys.stderr, flush=True)
        write(entries, args, common, model, stem)

    # order: no attack and the largest attack share first, then DP, then the other shares
    fractions = [float(x) for x in args.fractions.split(",")]
    first = list(dict.fromkeys(fractions[:1] + fractions[-1:]))
    rest = [f for f in fractions if f not in first]
    for block in (first, "dp", rest):
        if block == "dp":
            if only is None or "dp" in only:
                add_dp(entries, add)
        else:
            for f in block:
                for agg, overrides in AGGREGATORS.items():
                    if only is None or agg in only:
                        attack = [f"attack.fraction={f}", "attack.kind=sign_flip", f"attack.scale={args.scale}"] if f > 0 else []
                        add(f"{agg}-{f:g}", overrides + attack)
    print(table(entries))
    return write(entries, args, common, model, stem)


if __name__ == "__main__":
    main()
