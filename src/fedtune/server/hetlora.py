"""Heterogeneous LoRA ranks: clients with less compute train a lower rank.

Following HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024): the server keeps the global adapter at the largest rank
``R``; a client of rank ``r <= R`` receives the global adapter *truncated* to its first ``r``
ranks (rows of ``lora_A``, columns of ``lora_B``), trains only those, and its delta is
*zero-padded* back to ``R`` for aggregation.

Aggregation (``lora.hetlora_aggregation``):

``sparsity_weighted`` (the default; the paper's rule, its Figure 2 and text): every
client's local LoRA matrices ``B_k``, ``A_k`` (the truncated global plus its delta, zero-padded
to ``R``) are averaged with weights proportional to the Frobenius norm of the weight change
they make, ``S_k = ||Delta W_k||_F = ||B_k A_k||_F``, normalised over the round's clients:

    p_k = S_k / Z,   Z = sum_j S_j,   B = sum_k p_k B_k,   A = sum_k p_k A_k

so clients whose LoRA product is sparser (smaller) count less, and a slice a client did not
have enters as its zero padding. The weights are computed per LoRA module (each ``lora_A`` /
``lora_B`` pair); they do not use example counts. As a delta (what the server strategies
take), with ``m_k`` the client's rank mask and ``G`` the global adapter:

    delta = sum_k p_k delta_k - (sum_k p_k (1 - m_k)) * G

If every client's product is zero (``Z = 0``), the weights are equal.

``slice_mean`` (ours, not the paper's): each rank slice ``j`` is averaged over the clients
that trained it, weighted by their example counts:

    delta[j] = sum_{i: r_i > j} n_i * delta_i[j]  /  sum_{i: r_i > j} n_i

so a high-rank slice is not diluted by zeros from clients that never had it.

LoRA's scale ``alpha / R`` is the same for every client (so it cancels in ``p_k``), and a
truncated adapter computes exactly the top-``r`` part of the full one.
"""

from __future__ import annotations

import math
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


HETLORA_AGGREGATIONS = ("sparsity_weighted", "slice_mean")


def rank_mask(adapter: Adapter, rank: float) -> Adapter:
    """1 on the first ``rank`` rank slices of each tensor, 0 beyond (same shapes); a rank of
    ``math.inf`` (or above the tensor's) keeps every slice."""
    out = {}
    for k, v in adapter.items():
        r = int(min(rank, v.shape[rank_axis(k)]))
        m = torch.zeros_like(v)
        if rank_axis(k) == 0:
            m[:r] = 1
        else:
            m[:, :r] = 1
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
    """``slice_mean``: rank-slice-wise weighted average of zero-padded deltas (module docstring).

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


def lora_pairs(adapter: Adapter) -> list[tuple[str, str]]:
    """(lora_A key, lora_B key) of every LoRA module; ValueError for a tensor without its pair."""
    pairs = []
    for k in adapter:
        if rank_axis(k) == 0:
            head, _, tail = k.rpartition("lora_A")
            b = f"{head}lora_B{tail}"
            if b not in adapter:
                raise ValueError(f"{k} has no {b}")
            pairs.append((k, b))
    if 2 * len(pairs) != len(adapter):
        raise ValueError("every LoRA module needs one lora_A and one lora_B tensor")
    return pairs


def product_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B A||_F without forming the (out, in) product: ||BA||_F^2 = sum((B^T B) * (A A^T)),
    two (r, r) matrices, in float64."""
    b, a = b.double(), a.double()
    return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


def sparsity_weights(global_adapter: Adapter, deltas: Sequence[Adapter], ranks: Sequence[float], a_key: str, b_key: str) -> list[float]:
    """HetLoRA's p_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F for one LoRA module, where B_k, A_k
    are client k's local matrices (its truncated global plus its delta); equal if all are 0."""
    norms = []
    for d, r in zip(deltas, ranks):
        local = {k: truncate({k: global_adapter[k]}, r)[k] + d[k] for k in (a_key, b_key)}
        norms.append(product_norm(local[b_key], local[a_key]))
    z = sum(norms)
    return [n / z for n in norms] if z > 0 else [1 / len(norms)] * len(norms)


def sparsity_weighted(global_adapter: Adapter, deltas: Sequence[Adapter], ranks: Sequence[float]) -> Adapter:
    """``sparsity_weighted``: HetLoRA's aggregation (Cho et al. 2024, Figure 2) as a delta,
    ``sum_k p_k (m_k * G + delta_k) - G`` computed as ``sum_k p_k delta_k - (sum_k p_k (1 - m_k)) * G``
    (see the module docstring); a rank of ``math.inf`` means the full rank."""
    out: Adapter = {}
    for a_key, b_key in lora_pairs(global_adapter):
        p = sparsity_weights(global_adapter, deltas, ranks, a_key, b_key)
        for k in (a_key, b_key):
            g = global_adapter[k]
            dropped = sum(pk * (1 - m) for pk, m in zip(p, (rank_mask({k: g}, r)[k] for r in ranks)))
            out[k] = sum(pk * d[k] for pk, d in zip(p, deltas)) - dropped * g
    return out
