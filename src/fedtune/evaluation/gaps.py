"""The comparison's story in numbers: each held-out loss gap with a paired bootstrap interval.

For the models of a ``fedtune compare`` (base, local-<id>, federated, centralized), evaluated on
the same n held-out examples, the gaps read from the federated model's side (negative: the
federated model has the lower loss):

    federated − local-<id>            for each local-only client
    federated − best local-only       min over the clients, recomputed in each resample
    federated − median local-only     median over the clients, recomputed in each resample
    federated − centralized, federated − base

and the **fraction of the way** federated covers from the median local-only loss to the
centralized loss, ``(L_med − L_fed) / (L_med − L_cen)`` (1: as good as centralized, 0: no better
than the median local-only client). Each comes with a paired percentile interval over held-out
examples (evaluation/bootstrap.py). ROUGE-L and exact match get their intervals over the
answered examples the same way. Pure functions; the text lines are for the CLI and the report.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from fedtune.evaluation.bootstrap import estimate, ratio_interval, resample_indices, resampled_ratio
from fedtune.evaluation.generation import exact_match, rouge_l

FEDERATED = "federated"


def loss_gaps(per_example: dict[str, dict], rng: np.random.Generator, *, resamples: int, level: float) -> dict:
    """Held-out loss gaps of the federated model (see module doc) from each model's
    ``{"nll": [...], "tokens": [...]}`` per example (the same examples, in the same order).

    Returns ``{"examples", "resamples", "level", "gaps": [{"name", "value", "low", "high"}],
    "fraction": {...} or None}``; no gaps when there is no federated model."""
    names = list(per_example)
    n = len(next(iter(per_example.values()))["nll"]) if names else 0
    out = {"examples": n, "resamples": resamples, "level": level, "gaps": [], "fraction": None}
    if FEDERATED not in per_example or n == 0:
        return out
    idx = resample_indices(n, resamples, rng)  # (B, n): the same rows for every model
    point = {m: sum(v["nll"]) / max(sum(v["tokens"]), 1) for m, v in per_example.items()}
    boot = {m: resampled_ratio(v["nll"], v["tokens"], idx) for m, v in per_example.items()}  # m -> (B,)
    local = [m for m in names if m.startswith("local-")]
    others: list[tuple[str, float, np.ndarray]] = [(m, point[m], boot[m]) for m in local]
    if len(local) > 1:
        stacked = np.stack([boot[m] for m in local])  # (clients, B)
        best = min(local, key=lambda m: point[m])
        others.append((f"best local-only ({best})", point[best], stacked.min(axis=0)))
        others.append(("median local-only", float(np.median([point[m] for m in local])), np.median(stacked, axis=0)))
    others += [(m, point[m], boot[m]) for m in ("centralized", "base") if m in point]
    fed, fed_boot = point[FEDERATED], boot[FEDERATED]
    out["gaps"] = [{"name": f"{FEDERATED} - {name}", **estimate(fed - p, fed_boot - b, level)} for name, p, b in others]
    if local and "centralized" in point:
        med_p = float(np.median([point[m] for m in local]))
        med_b = np.median(np.stack([boot[m] for m in local]), axis=0)
        out["fraction"] = {**estimate(_fraction(med_p, fed, point["centralized"]),
                                      _fraction(med_b, fed_boot, boot["centralized"]), level),
                           "median_local": med_p, "centralized": point["centralized"]}
    return out


def _fraction(median_local, federated, centralized):
    """(median − federated) / (median − centralized); nan where the denominator is 0."""
    den = np.asarray(median_local - centralized, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, (median_local - federated) / np.where(den != 0, den, 1.0), np.nan)


def accuracy_gap(before: Sequence[float], after: Sequence[float], rng: np.random.Generator, *, resamples: int,
                 level: float) -> dict:
    """DPO: held-out reward accuracy after − before (e.g. final vs starting adapter, or federated
    vs local-only) from each pair's accuracy (1, ½, 0; PreferenceEvaluator per_example), with a
    paired bootstrap interval over the pairs. ``{"value", "low", "high", "examples"}``."""
    n = len(before)
    if n == 0 or len(after) != n:
        raise ValueError("before and after must score the same, non-empty set of pairs")  # internal
    idx = resample_indices(n, resamples, rng)
    ones = [1.0] * n
    diff = resampled_ratio(after, ones, idx) - resampled_ratio(before, ones, idx)
    return {**estimate(float(np.mean(after) - np.mean(before)), diff, level), "examples": n}


def answer_intervals(answers: dict[str, Sequence[str]], references: Sequence[str], rng: np.random.Generator, *,
                     resamples: int, level: float) -> dict:
    """``{model: {"rouge_l": estimate, "exact_match": estimate}}`` with intervals over the
    answered examples (the same resampled answers for every model)."""
    n = len(references)
    if n == 0:
        return {}
    idx = resample_indices(n, resamples, rng)
    ones = [1.0] * n
    scores: dict[str, Callable[[str, str], float]] = {"rouge_l": lambda a, r: rouge_l(a, r)["f"], "exact_match": exact_match}
    return {m: {k: ratio_interval([f(a, r) for a, r in zip(texts, references)], ones, idx, level) for k, f in scores.items()}
            for m, texts in answers.items()}


def gap_lines(gaps: dict) -> list[str]:
    """The gaps as text, one per line (for the CLI; the report uses the same words)."""
    if not gaps.get("gaps"):
        return []
    pct = f"{100 * gaps['level']:g}%"
    lines = [f"held-out loss gaps on {gaps['examples']} held-out examples ({pct} paired bootstrap interval over examples, "
             f"{gaps['resamples']} resamples; negative: {FEDERATED} has the lower loss):"]
    width = max(len(g["name"]) for g in gaps["gaps"])
    for g in gaps["gaps"]:
        lines.append(f"  {g['name']:<{width}}  {g['value']:+.4f} nats  [{g['low']:+.4f}, {g['high']:+.4f}]  {verdict(g)}")
    frac = gaps.get("fraction")
    if frac is not None:
        lines.append(f"  {FEDERATED} is {fraction_text(frac)} of the way from the median local-only loss "
                     f"({frac['median_local']:.4f}) to the centralized loss ({frac['centralized']:.4f})")
    return lines


def verdict(gap: dict) -> str:
    """Whether the interval excludes 0."""
    if np.isnan(gap["low"]):
        return ""
    if gap["high"] < 0:
        return "lower"
    if gap["low"] > 0:
        return "higher"
    return "interval includes 0"


def fraction_text(frac: dict) -> str:
    value = frac["value"]
    if np.isnan(value):
        return "- (median local-only and centralized losses are equal)"
    return f"{100 * value:.0f}% [{100 * frac['low']:.0f}%, {100 * frac['high']:.0f}%]"


def with_interval(est: Optional[dict], digits: int = 3) -> str:
    """"0.153 [0.120, 0.190]" (or "-")."""
    if not est or est.get("value") is None or np.isnan(est["value"]):
        return "-"
    return f"{est['value']:.{digits}f} [{est['low']:.{digits}f}, {est['high']:.{digits}f}]"


def answer_note(comp: dict) -> str:
    """What the ROUGE-L / EM brackets are."""
    gaps = comp["summary"].get("gaps") or {}
    level, resamples = gaps.get("level", 0.95), gaps.get("resamples")
    return f"{100 * level:g}% bootstrap intervals over the answers ({resamples} resamples)"
