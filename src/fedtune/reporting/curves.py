"""Per-round curves of the held-out evaluation: one panel per metric (loss and perplexity for
SFT; DPO loss, reward accuracy, margin, rewards and log-probs for DPO; with DP, epsilon next
to them), written as a PNG.

Uses matplotlib's object API (no pyplot), so it changes no global backend or state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fedtune.reporting.metrics import read_metrics

EVAL_PLOT = "eval.png"
NOT_PLOTTED = {"type", "round", "tokens", "examples", "delta"}  # delta: the DP delta, a constant


def plot_eval(metrics_file: Path, out: Path) -> Optional[Path]:
    """Plot every numeric metric of the ``eval`` records in ``metrics_file`` against the round.
    Returns ``out``, or None when there is no evaluation to plot."""
    evals = [r for r in read_metrics(metrics_file) if r["type"] == "eval"]
    if not evals:
        return None
    keys = [k for k, v in evals[0].items() if k not in NOT_PLOTTED and isinstance(v, (int, float)) and not isinstance(v, bool)]
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = min(len(keys), 4)
    rows = -(-len(keys) // cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    rounds = [r["round"] for r in evals]
    for ax, key in zip(axes, keys):
        ax.plot(rounds, [r.get(key) for r in evals], marker="o")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(f"held-out evaluation per round ({metrics_file.parent.name})")
    fig.savefig(out, dpi=100)
    return out
