"""Run fedtune's performance measurements and write one results.json plus a table.

    python -m benchmarks                 # all, on the bundled SmolLM2-135M (about an hour on 2 CPU cores)
    python -m benchmarks --quick         # all, on a tiny model (minutes)
    python -m benchmarks --only efficiency,memory

Every figure is a ratio against a baseline measured in the same session (machines are noisy).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from benchmarks.common import RESULTS, machine, write_json

ALL = ("efficiency", "throughput", "memory", "communication")
HEADLINE = {
    "efficiency": ("efficiency", "plain-loop seconds / fedtune seconds"),
    "throughput": ("speedup_real_tokens_per_s", "real tokens/s vs Shepherd-style loop"),
    "memory": ("ratio", "peak RSS 1,000 clients / 10 clients"),
    "communication": ("best_ratio_within_1pct", "fewest bytes vs fp32 with loss within 1%"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model instead of the bundled one")
    p.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {', '.join(ALL)}")
    p.add_argument("--out", type=Path, help="results file (default benchmarks/results/results[-quick].json)")
    args = p.parse_args()
    results = {"machine": machine(), "quick": args.quick}
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in ALL:
            p.error(f"unknown benchmark {name!r}; choose from {', '.join(ALL)}")
        print(f"running {name} ...", flush=True)
        results[name] = importlib.import_module(f"benchmarks.{name}").measure(quick=args.quick)
    out = args.out or RESULTS / ("results-quick.json" if args.quick else "results.json")
    write_json(out, results)
    print(f"\n{'benchmark':<14} {'figure':>10}  {'target':<24} meaning")
    for name, (key, meaning) in HEADLINE.items():
        if name in results:
            r = results[name]
            print(f"{name:<14} {r[key]:>10.3f}  {str(r.get('target', r.get('targets', ''))):<24.24} {meaning}")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
