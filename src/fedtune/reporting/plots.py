"""Figures for run and comparison reports, written as PNG files.

Each function takes plain data and an output path, draws one figure on its own
``matplotlib.figure.Figure`` (Agg canvas, never pyplot: no global figure state, safe in
threads and servers) and returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110


MAX_TICKS = 40  # beyond this many clients (or rounds) a plot labels no individual ones


def _figure(width: float = 7.5, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def loss_curves(
    series: Mapping[str, Sequence[tuple[int, float]]],
    path: Path,
    *,
    title: str = "held-out loss per round",
    thin: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    dashed: Sequence[str] = (),
) -> Path:
    """One line per series of (round, loss); ``thin`` series (e.g. categories) drawn lighter,
    ``dashed`` ones (e.g. the untrained base model) as dashed lines without markers."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, points in (thin or {}).items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, linewidth=0.8, alpha=0.45, label=name)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            style = dict(linestyle="--", linewidth=1.5) if name in dashed else dict(marker="o", linewidth=2.2)
            ax.plot(xs, ys, label=name, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("loss (nats / response token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2 if len(series) + len(thin or {}) > 6 else 1)
    return _save(fig, path)


def category_bars(values: Mapping[str, Mapping[str, float]], path: Path, *, ylabel: str, title: str) -> Path:
    """Grouped bars: categories along x, one bar per model (``values[model][category]``)."""
    models = list(values)
    categories = sorted({c for v in values.values() for c in v})
    fig = _figure(max(7.5, 0.9 * len(categories) + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, [values[model].get(c, float("nan")) for c in categories], width=width, label=model)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=8)
    finite = [v for per in values.values() for v in per.values() if v == v]
    if finite and min(finite) > 0:  # zoom in: differences between models are small next to the values
        lo, hi = min(finite), max(finite)
        pad = 0.1 * (hi - lo) + 0.01 * hi
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def participation(rounds: Sequence[tuple[int, Sequence[int]]], num_clients: int, path: Path) -> Path:
    """A round x client grid: a filled cell where the client trained in that round."""
    fig = _figure(min(14.0, max(5.0, 0.35 * len(rounds) + 2.5)), min(10.0, max(2.5, 0.28 * num_clients + 1.2)))  # bounded: 1,000 clients must not make a 30,000-pixel image
    ax = fig.add_subplot()
    grid = [[0.0] * max(len(rounds), 1) for _ in range(num_clients)]
    for col, (_, clients) in enumerate(rounds):
        for c in clients:
            if 0 <= c < num_clients:
                grid[c][col] = 1.0
    ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
    if len(rounds) <= MAX_TICKS:
        ax.set_xticks(range(len(rounds)), [str(r) for r, _ in rounds], fontsize=7)
    if num_clients <= MAX_TICKS:
        ax.set_yticks(range(num_clients), [str(c) for c in range(num_clients)], fontsize=7)
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    counts = [sum(row) for row in grid]
    ax.set_title(f"client participation ({int(sum(counts))} fits; per client {int(min(counts))}-{int(max(counts))})")
    return _save(fig, path)


def partition_histogram(table: Mapping[str, Mapping[str, int]], path: Path) -> Path:
    """Stacked bars: examples per client (x), split by category (colour)."""
    clients = list(table)
    categories = sorted({c for row in table.values() for c in row})
    fig = _figure(min(14.0, max(6.0, 0.45 * len(clients) + 3)), 4.0)
    ax = fig.add_subplot()
    bottom = [0] * len(clients)
    cmap = matplotlib.colormaps["tab20" if len(categories) > 10 else "tab10"]
    for i, cat in enumerate(categories):
        heights = [table[c].get(cat, 0) for c in clients]
        ax.bar(range(len(clients)), heights, bottom=bottom, label=cat, color=cmap(i % cmap.N), width=1.0 if len(clients) > MAX_TICKS else 0.8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    if len(clients) <= MAX_TICKS:
        ax.set_xticks(range(len(clients)), clients, fontsize=7, rotation=0 if len(clients) < 16 else 90)
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_title("examples per client per category")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def privacy_curves(loss: Sequence[tuple[int, float]], epsilon: Sequence[tuple[int, float]], delta: float, path: Path) -> Path:
    """Held-out loss and the privacy spent (epsilon at ``delta``) per round, side by side."""
    fig = _figure(9.0, 3.4)
    left, right = fig.subplots(1, 2)
    for ax, points, label in ((left, loss, "held-out loss"), (right, epsilon, f"epsilon (delta={delta:g})")):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", linewidth=2.0)
        ax.set_xlabel("round")
        ax.set_title(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def judge_chart(rows: Sequence[Mapping], path: Path, *, reference: str) -> Path:
    """The FedIT judge figure: each model's relative score (% of the reference's summed ratings;
    the reference at 100%) and its wins/ties/losses against the reference, side by side."""
    fig = _figure(9.0, 0.45 * len(rows) + 1.8)
    scores, outcomes = fig.subplots(1, 2, width_ratios=[3, 2])
    names = [r["model"] for r in rows]
    ys = range(len(rows))
    rel = [100 * r["relative"] if r["relative"] is not None else 0.0 for r in rows]
    bars = scores.barh(ys, rel, color=["#888888" if r["win"] is None else "#3b75af" for r in rows])
    for bar, r in zip(bars, rows):
        text = "no parsed ratings" if r["relative"] is None else f"{100 * r['relative']:.1f}%"
        scores.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}", va="center", fontsize=7)
    scores.axvline(100, color="black", linewidth=0.8, linestyle="--")
    scores.set_yticks(list(ys), names, fontsize=8)
    scores.invert_yaxis()
    scores.set_xlabel(f"relative score (% of {reference})")
    scores.set_xlim(0, max([110.0, *rel]) * 1.15)
    left = [0] * len(rows)
    for key, color in (("win", "#4c9a4c"), ("tie", "#bbbbbb"), ("loss", "#c44e52")):
        counts = [r[key] or 0 for r in rows]
        outcomes.barh(ys, counts, left=left, color=color, label=key)
        left = [a + b for a, b in zip(left, counts)]
    outcomes.set_yticks(list(ys), [""] * len(rows))
    outcomes.invert_yaxis()
    outcomes.set_xlabel("questions (pairwise, both orders)")
    outcomes.legend(fontsize=7, ncols=3, loc="lower right")
    fig.suptitle(f"LLM judge: relative score and win/tie/loss against {reference}", fontsize=10)
    return _save(fig, path)
