"""Heterogeneous LoRA ranks: clients with less compute train a lower rank.

Following HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024): the server keeps the global adapter at the largest rank
``R``; a client of rank ``r <= R`` receives the global adapter *truncated* to its first ``r``
ranks (rows of ``lora_A``, columns of ``lora_B``), trains only those, and its delta is
*zero-padded* back to ``R`` for aggregation.

Aggregation (our choice among the paper's options, stated here): each rank slice ``j`` is
averaged over the clients that trained it, weighted by their example counts:

    delta[j] = sum_{i: r_i > j} n_i * delta_i[j]  /  sum_{i: r_i > j} n_i

so a high-rank slice is not diluted by zeros from clients that never had it (plain
zero-padded averaging would shrink it by the fraction of low-rank clients). LoRA's scale
``alpha / R`` is the same for every client, so a truncated adapter computes exactly the
top-``r`` part of the full one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fedtune.types import Adapter


def rank_axis(key: str) -> int:
    """Axis of the rank dimension: rows of lora_A (r, in), columns of lora_B (out, r)."""
    if "lora_A" in key:
        return 0
    if "lora_B" in key:
        return 1
    raise ValueError(f"{key} is not a LoRA A/B tensor")


def rank_mask(adapter: Adapter, rank: int) -> Adapter:
    """1 on the first ``rank`` rank slices of each tensor, 0 beyond (same shapes)."""
    out = {}
    for k, v in adapter.items():
        m = torch.zeros_like(v)
        if rank_axis(k) == 0:
            m[:rank] = 1
        else:
            m[:, :rank] = 1
        out[k] = m
    return out


def truncate(adapter: Adapter, rank: int) -> Adapter:
    """The adapter a rank-``rank`` client gets: slices beyond ``rank`` zeroed (shapes kept,
    so the shared model's LoRA modules are reused)."""
    mask = rank_mask(adapter, rank)
    return {k: v * mask[k] for k, v in adapter.items()}


def client_view(adapter: Adapter, rank: Optional[int]) -> tuple[Adapter, Optional[Adapter]]:
    """What a client of ``rank`` starts from and may train: (the truncated adapter, its rank
    mask); (``adapter``, None) for a full-rank client (``rank`` None)."""
    if rank is None:
        return adapter, None
    return truncate(adapter, rank), rank_mask(adapter, rank)


def aggregate_ranks(deltas: Sequence[Adapter], ranks: Sequence[float], weights: Sequence[float]) -> Adapter:
    """Rank-slice-wise weighted average of zero-padded deltas (see module docstring).

    A slice no client trained stays zero; a rank of ``math.inf`` means the full rank.
    """
    keys = deltas[0].keys()
    out: Adapter = {}
    for k in keys:
        axis = rank_axis(k)
        full = deltas[0][k].shape[axis]
        num = torch.zeros_like(deltas[0][k])
        den = torch.zeros(full, dtype=torch.float32)  # (R,) weight that reached each slice
        for d, r, w in zip(deltas, ranks, weights):
            num += w * d[k]
            den[: int(min(r, full))] += w
        shape = [1, 1]
        shape[axis] = full
        out[k] = num / torch.where(den > 0, den, torch.ones_like(den)).view(shape)
    return out
