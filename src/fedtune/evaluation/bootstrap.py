"""Bootstrap confidence intervals over evaluation examples (Efron & Tibshirani, 1993, ch. 13).

Every metric fedtune compares is a ratio of sums over examples i = 1..n:

    held-out loss   L = Σ_i nll_i / Σ_i tokens_i        (token-weighted, as in training)
    ROUGE-L, EM     m = Σ_i score_i / n                  (den_i = 1)

A resample b draws n example indices with replacement, idx_b = (j_1 .. j_n), and recomputes
every model's metric on those same indices (a *paired* bootstrap: both models of a gap see
the same examples, so the per-example correlation between them cancels out of the interval):

    L_m(b) = Σ_k nll_m[j_k] / Σ_k tokens_m[j_k]
    gap(b) = f(L_1(b), ..., L_M(b))           e.g. L_fed(b) − median_c L_local-c(b)

The interval is the percentile interval of gap(b) over B resamples, at ``level`` (0.95:
the 2.5th and 97.5th percentiles, numpy's linear interpolation). Pure functions of numpy
arrays; the indices come from an explicit seeded generator.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def resample_indices(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) example indices drawn with replacement."""
    return rng.integers(0, n, size=(resamples, n))


def resampled_ratio(num: Sequence[float], den: Sequence[float], indices: np.ndarray) -> np.ndarray:
    """Σ num[idx] / Σ den[idx] for each row idx of ``indices`` (a row with Σ den = 0 gives nan). Shape (resamples,)."""
    num_a, den_a = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    top, bottom = num_a[indices].sum(axis=1), den_a[indices].sum(axis=1)  # (B,), (B,)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of ``samples`` (nan entries dropped)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")  # internal
    kept = samples[~np.isnan(samples)]
    if kept.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(kept, [tail, 100.0 - tail])
    return float(low), float(high)


def estimate(point: float, samples: np.ndarray, level: float) -> dict:
    """{"value", "low", "high"}: a point estimate with its bootstrap percentile interval."""
    low, high = percentile_interval(samples, level)
    return {"value": float(point), "low": low, "high": high}


def ratio_interval(num: Sequence[float], den: Sequence[float], indices: np.ndarray, level: float) -> dict:
    """One model's Σ num / Σ den with its interval (e.g. ROUGE-L over answers: den = 1)."""
    point = float(np.sum(num)) / float(np.sum(den)) if np.sum(den) > 0 else float("nan")
    return estimate(point, resampled_ratio(num, den, indices), level)
