"""How the clients' deltas of a round become one server step: validation first, then one
of the aggregators below. Every strategy takes an aggregator, so any of them composes with
FedAvg, FedAvgM, FedProx, SCAFFOLD or the adaptive server optimisers.

Aggregators (``strategy.aggregator``), for deltas d_1..d_n with example counts n_1..n_n:

    mean          sum_i w_i d_i,  w_i = n_i / sum_j n_j                    (weighted)
    median        coordinate-wise median; for even n the mean of the two middle values
    trimmed_mean  per coordinate, drop the floor(beta*n) smallest and largest values and
                  average the rest (Yin et al., "Byzantine-Robust Distributed Learning:
                  Towards Optimal Statistical Rates", ICML 2018)
    krum          the d_i with the smallest score s_i = sum of its squared distances to its
                  n - f - 2 nearest other deltas; needs n > 2f + 2 (Blanchard et al.,
                  "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
                  NeurIPS 2017)
    multikrum     the plain mean of the m deltas with the smallest Krum scores (m = n - f
                  unless set; El Mhamdi et al., "The Hidden Vulnerability of Distributed
                  Learning in Byzantium", ICML 2018)

Aggregators are called as ``aggregator(updates, global_adapter)``; only ``mean`` reads the
global adapter (HetLoRA's sparsity-weighted aggregation of heterogeneous ranks needs each
client's local LoRA matrices, not only its delta).

Weighting: only ``mean`` uses num_examples. The robust rules are unweighted on purpose: a
client's claimed example count is as much under an attacker's control as its delta, so
weighting by it would let one client outvote the rest.

Updates are put in client-id order before any arithmetic, so the result does not depend on
the order in which clients answered (bit for bit, not only up to rounding).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fedtune.config import AGGREGATOR_PARAMS, AGGREGATORS
from fedtune.errors import AggregationError, ConfigError
from fedtune.server.hetlora import HETLORA_AGGREGATIONS, aggregate_ranks, sparsity_weighted
from fedtune.types import Adapter, ClientUpdate


# ----------------------------------------------------------------------------- validation


def check_updates(global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """The updates in client-id order, after checking that every delta has the global's
    keys, shapes and dtype and finite values, that client ids are unique, and that the
    example counts are non-negative integers with a positive total. Never relies on
    broadcasting."""
    if not updates:
        raise AggregationError("no client updates to aggregate this round")
    for u in updates:
        check_tensors(global_adapter, u.delta, f"client {u.client_id}")
        if not (isinstance(u.num_examples, int) and u.num_examples >= 0):
            raise AggregationError(f"client {u.client_id}: num_examples must be a non-negative integer, got {u.num_examples!r}")
    ordered = sorted(updates, key=lambda u: u.client_id)
    for a, b in zip(ordered, ordered[1:]):
        if a.client_id == b.client_id:
            raise AggregationError(f"client {a.client_id}: sent two updates in one round; each client answers once")
    if sum(u.num_examples for u in ordered) <= 0:
        raise AggregationError("client updates carry zero examples in total; nothing to weight by")
    return ordered


def check_tensors(like: Adapter, tensors: Adapter, who: str, what: str = "adapter") -> None:
    """``tensors`` has exactly the keys, shapes and dtypes of ``like`` and finite values."""
    if tensors.keys() != like.keys():
        missing = sorted(like.keys() - tensors.keys())
        extra = sorted(tensors.keys() - like.keys())
        raise AggregationError(f"{who}: {what} keys differ (missing {missing[:2]}, unexpected {extra[:2]})")
    for k, g in like.items():
        d = tensors[k]
        if d.shape != g.shape or d.dtype != g.dtype:
            raise AggregationError(f"{who}: tensor {k} is {tuple(d.shape)} {d.dtype}, expected {tuple(g.shape)} {g.dtype}")
        if not torch.isfinite(d).all():
            raise AggregationError(f"{who}: tensor {k} has NaN or Inf values")


# ----------------------------------------------------------------------------- weighted mean


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """w_i = n_i / sum_j n_j."""
    total = sum(u.num_examples for u in updates)
    weights = [u.num_examples / total for u in updates]
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-9)
    return weights


def weighted_delta(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> Adapter:
    """sum_i w_i * delta_i, key by key."""
    keys = updates[0].delta.keys()
    return {k: sum(w * u.delta[k] for w, u in zip(weights, updates)) for k in keys}


def _sorted_stack(updates: Sequence[ClientUpdate], key: str) -> torch.Tensor:
    """The clients' values of one tensor, sorted per coordinate: (n, *shape)."""
    return torch.stack([u.delta[key] for u in updates]).sort(dim=0).values


# ----------------------------------------------------------------------------- aggregators


class Mean:
    """sum_i w_i d_i with w_i = n_i / sum_j n_j (FedAvg's average, weighted by examples).
    When clients trained different LoRA ranks (HetLoRA, ``lora.client_ranks``), ``hetlora``
    picks the rule (server/hetlora.py): ``sparsity_weighted`` (Cho et al. 2024: weights
    proportional to ||B_k A_k||_F, needs the global adapter) or ``slice_mean`` (each rank
    slice averaged over the clients that trained it, by examples)."""

    name = "mean"

    def __init__(self, hetlora: str = "sparsity_weighted"):
        if hetlora not in HETLORA_AGGREGATIONS:
            raise ConfigError(f"lora.hetlora_aggregation: '{hetlora}' is not one of {', '.join(HETLORA_AGGREGATIONS)}")
        self.hetlora = hetlora

    def __call__(self, updates: Sequence[ClientUpdate], global_adapter: Optional[Adapter] = None) -> Adapter:
        weights = example_weights(updates)
        if all(u.rank is None for u in updates):
            return weighted_delta(updates, weights)
        ranks = [u.rank if u.rank is not None else math.inf for u in updates]
        deltas = [u.delta for u in updates]
        if self.hetlora == "slice_mean":
            return aggregate_ranks(deltas, ranks, weights)
        if global_adapter is None:
            raise AggregationError("mean: sparsity-weighted HetLoRA aggregation needs the global adapter; pass global_adapter")
        return sparsity_weighted(global_adapter, deltas, ranks)


class Median:
    """Coordinate-wise median, unweighted; for even n the mean of the two middle values
    (so the result is symmetric in the clients). Ignores up to ceil(n/2) - 1 arbitrary deltas."""

    name = "median"

    def __call__(self, updates: Sequence[ClientUpdate], global_adapter: Optional[Adapter] = None) -> Adapter:
        n, out = len(updates), {}
        for k in updates[0].delta:
            x = _sorted_stack(updates, k)  # (n, *shape)
            out[k] = (x[(n - 1) // 2] + x[n // 2]) / 2
        return out


class TrimmedMean:
    """Per coordinate, the unweighted mean of the values left after dropping the
    t = floor(beta * n) smallest and t largest (Yin et al. 2018). Ignores up to t
    arbitrary deltas; with t = 0 it is the unweighted mean."""

    name = "trimmed_mean"

    def __init__(self, beta: float):
        if not 0 <= beta < 0.5:
            raise ConfigError(f"strategy.trim_beta: must be in [0, 0.5) so that values remain, got {beta}")
        self.beta = beta

    def __call__(self, updates: Sequence[ClientUpdate], global_adapter: Optional[Adapter] = None) -> Adapter:
        n = len(updates)
        t = math.floor(self.beta * n + 1e-9)  # 1e-9: 0.3 * 10 is 3, not 2.999...
        return {k: _sorted_stack(updates, k)[t : n - t].mean(dim=0) for k in updates[0].delta}


class Krum:
    """Krum (Blanchard et al. 2017) with ``m = 1``; Multi-Krum (El Mhamdi et al. 2018) with
    ``m > 1`` or ``m = None`` (n - f): the plain mean of the m deltas with the lowest scores

        s_i = sum_{j in N_i} ||d_i - d_j||^2,  N_i = the n - f - 2 deltas nearest to d_i,

    where f is the number of attackers to tolerate; needs n > 2f + 2. Ties in the score go to
    the lower client id. Distances are computed in float64 (squares of large float32 values
    overflow float32)."""

    def __init__(self, f: int, m: Optional[int] = 1):
        if not (isinstance(f, int) and f >= 0):
            raise ConfigError(f"strategy.krum_f: must be a non-negative integer, got {f!r}")
        if m is not None and not (isinstance(m, int) and m >= 1):
            raise ConfigError(f"strategy.multikrum_m: must be a positive integer, got {m!r}")
        self.f, self.m = f, m
        self.name = "krum" if m == 1 else "multikrum"

    def scores(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        """s_i for every update: (n,) float64."""
        n = len(updates)
        if n <= 2 * self.f + 2:
            raise AggregationError(
                f"{self.name}: {n} client updates this round, but strategy.krum_f={self.f} needs more than "
                f"2f+2={2 * self.f + 2}; lower strategy.krum_f or raise federation.min_clients"
            )
        d2 = torch.zeros(n, n, dtype=torch.float64)
        for k in updates[0].delta:
            x = torch.stack([u.delta[k].reshape(-1) for u in updates]).double()  # (n, p)
            for i in range(n):  # exact squared distances, one row at a time: (n - i - 1, p) in memory
                d2[i, i + 1 :] += (x[i + 1 :] - x[i]).square().sum(dim=1)
        d2 = d2 + d2.T
        d2.fill_diagonal_(math.inf)
        return d2.sort(dim=1).values[:, : n - self.f - 2].sum(dim=1)

    def __call__(self, updates: Sequence[ClientUpdate], global_adapter: Optional[Adapter] = None) -> Adapter:
        n = len(updates)
        m = n - self.f if self.m is None else self.m
        if m > n - self.f:
            raise AggregationError(
                f"multikrum: strategy.multikrum_m={m} is more than the {n} updates of this round minus "
                f"strategy.krum_f={self.f}; lower strategy.multikrum_m"
            )
        scores = self.scores(updates).tolist()
        chosen = sorted(sorted(range(n), key=lambda i: (scores[i], updates[i].client_id))[:m])  # in client order
        return {k: torch.stack([updates[i].delta[k] for i in chosen]).mean(dim=0) for k in updates[0].delta}


def build_aggregator(
    name: str = "mean",
    *,
    trim_beta: Optional[float] = None,
    krum_f: Optional[int] = None,
    multikrum_m: Optional[int] = None,
    hetlora: str = "sparsity_weighted",
):
    """The aggregator registered under ``strategy.aggregator`` with its parameters (each
    parameter is for the aggregators named in ``config.AGGREGATOR_PARAMS``; giving one to
    another aggregator is an error, not silently ignored)."""
    given = {"trim_beta": trim_beta, "krum_f": krum_f, "multikrum_m": multikrum_m}
    unused = [k for k, v in given.items() if v is not None and k not in AGGREGATOR_PARAMS.get(name, ())]
    if unused:
        raise ConfigError([f"strategy.{k}: strategy.aggregator={name} does not use it; remove it" for k in unused])
    if name == "mean":
        return Mean(hetlora)
    if name == "median":
        return Median()
    if name == "trimmed_mean":
        if trim_beta is None:
            raise ConfigError("strategy.trim_beta: trimmed_mean needs the fraction to trim at each end, e.g. 0.1")
        return TrimmedMean(trim_beta)
    if name in ("krum", "multikrum"):
        if krum_f is None:
            raise ConfigError(f"strategy.krum_f: {name} needs the number of attackers to tolerate, e.g. 1")
        return Krum(krum_f, 1 if name == "krum" else multikrum_m)
    raise ConfigError(f"strategy.aggregator: '{name}' is not one of {', '.join(AGGREGATORS)}")
