"""Aggregation strategies: pure tensor math on adapters, with explicit state.

A strategy fixes its hyper-parameters in ``__init__``. Anything that evolves across rounds
(server momenta, control variates) lives in a ``State`` dict of tensors that is passed in and
returned, so it is checkpointed and resumed exactly. No I/O, logging, model or RNG here.

    init_state(global_adapter) -> state
    client_config(round, state) -> dict              what clients must know this round
    aggregate(global_adapter, updates, state) -> (new_global_adapter, new_state)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fedtune.errors import AggregationError
from fedtune.types import Adapter, ClientUpdate

State = dict[str, torch.Tensor]


def check_updates(global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> None:
    """Every delta has the global's keys, shapes and dtype and finite values, and the
    example-count weights are finite with a positive total. Never rely on broadcasting."""
    if not updates:
        raise AggregationError("no client updates to aggregate this round")
    keys = global_adapter.keys()
    for u in updates:
        if u.delta.keys() != keys:
            missing = sorted(keys - u.delta.keys())
            extra = sorted(u.delta.keys() - keys)
            raise AggregationError(f"client {u.client_id}: adapter keys differ (missing {missing[:2]}, unexpected {extra[:2]})")
        for k, g in global_adapter.items():
            d = u.delta[k]
            if d.shape != g.shape or d.dtype != g.dtype:
                raise AggregationError(
                    f"client {u.client_id}: tensor {k} is {tuple(d.shape)} {d.dtype}, expected {tuple(g.shape)} {g.dtype}"
                )
            if not torch.isfinite(d).all():
                raise AggregationError(f"client {u.client_id}: tensor {k} has NaN or Inf values")
        if not (isinstance(u.num_examples, int) and u.num_examples >= 0):
            raise AggregationError(f"client {u.client_id}: num_examples must be a non-negative integer, got {u.num_examples!r}")
    if sum(u.num_examples for u in updates) <= 0:
        raise AggregationError("client updates carry zero examples in total; nothing to weight by")


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


class FedAvg:
    """Federated averaging (McMahan et al., "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017), on adapter deltas:

        x_{t+1} = x_t + sum_i (n_i / n) * delta_i,   delta_i = x_i^local - x_t

    which equals the example-weighted average of the clients' local adapters.
    """

    name = "fedavg"

    def init_state(self, global_adapter: Adapter) -> State:
        return {}

    def client_config(self, round: int, state: State) -> dict:
        return {}

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate], state: State) -> tuple[Adapter, State]:
        check_updates(global_adapter, updates)
        step = weighted_delta(updates, example_weights(updates))
        return {k: global_adapter[k] + step[k] for k in global_adapter}, state


def build_strategy(name: str):
    """The strategy registered under ``strategy.name``."""
    return {"fedavg": FedAvg}[name]()
