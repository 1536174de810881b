"""Comparing results that differ only in the order of float operations: packed vs padded,
chunked vs plain, batched vs one by one, Flower vs in-process, resumed vs straight.

Their differences scale with the magnitude of what is compared and with the CPU (AVX2 and
AVX-512 kernels sum in different orders), so a fixed ``atol`` is both too tight for large
values and too loose for small ones: every tolerance here is ``rel`` times the largest
magnitude compared (per tensor). An entry near zero inherits the rounding error of its large
neighbours' sums, which an elementwise ``rtol`` would not allow for.

Tolerances used by the suite:

- ``FORWARD`` (1e-5): losses and log-probabilities of one forward, several float32 roundings
  of the largest value.
- ``GRAD`` (1e-4): gradients (a backward pass sums many more terms).
- ``TRAINED`` (1e-3): adapters and deltas after AdamW steps. Adam divides by sqrt(v) + eps, so
  a gradient entry near zero turns a 1e-7 relative difference into a visible one: packed vs
  padded DPO deltas (3 steps at lr 1e-2, largest entry 0.03) differ by 1.27e-6 (4e-5) on an
  AVX-512 EPYC and by 4.3e-6 (1.45e-4) on an AVX-512/AMX Xeon. A real bug moves entries by a
  fraction of lr or flips signs: a packed row that drops one labelled
  token per example, or lets two examples attend to each other, fails the delta comparison
  alone (largest difference 1.8-2x the largest entry), and the losses (``FORWARD``) too.
"""

from __future__ import annotations

import torch

FORWARD = 1e-5
GRAD = 1e-4
TRAINED = 1e-3


def close(a: torch.Tensor, b: torch.Tensor, rel: float, scale: float = 0.0) -> bool:
    """max|a - b| <= rel * max(max|a|, max|b|, scale); shapes must match."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach().double(), b.detach().double()
    bound = rel * max(float(a.abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0, scale)
    return float((a - b).abs().max()) <= bound if a.numel() else True


def adapters_close(a: dict, b: dict, rel: float = TRAINED) -> bool:
    """Same keys, and every tensor :func:`close` at ``rel`` of its own magnitude."""
    return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)


def numbers_close(a: float, b: float, rel: float, scale: float = 0.0) -> bool:
    """|a - b| <= rel * max(|a|, |b|, scale): ``scale`` for a quantity that may be near zero
    while the numbers it is computed from are not (a DPO margin: pass its log-probs' size)."""
    return abs(a - b) <= rel * max(abs(a), abs(b), scale)


def margin_scale(metrics: dict, beta: float) -> float:
    """The size a DPO margin's rounding error scales with: beta * (|chosen logp| + |rejected logp|)
    (a margin is a difference of differences of log-probs, each of that size)."""
    return beta * (abs(metrics["chosen_logp"]) + abs(metrics["rejected_logp"]))
