"""The strategy contract and registry.

A strategy fixes its hyper-parameters in ``__init__``. Anything that evolves across rounds
(server momenta, second moments, control variates) lives in a ``State`` dict of tensors
that is passed in and returned, so it is checkpointed and resumed exactly. No I/O, logging,
model or RNG in a strategy.

    init_state(global_adapter) -> state
    client_config(round, state) -> dict              what clients must know this round
    aggregate(global_adapter, updates, state) -> (new_global_adapter, new_state)

One strategy per module (fedavg, fedavgm, fedprox, scaffold; fedadagrad, fedadam and
fedyogi over fedopt); how client deltas are combined (mean or a robust rule) is the
aggregator every strategy takes (aggregate.py).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

from fedtune.config import STRATEGIES, STRATEGY_PARAMS
from fedtune.errors import ConfigError
from fedtune.server.aggregate import check_updates, example_weights, weighted_delta  # noqa: F401  (public API)
from fedtune.server.fedadagrad import FedAdagrad
from fedtune.server.fedadam import FedAdam
from fedtune.server.fedavg import FedAvg
from fedtune.server.fedavgm import FedAvgM
from fedtune.server.fedprox import FedProx
from fedtune.server.fedyogi import FedYogi
from fedtune.server.scaffold import Scaffold
from fedtune.server.state import State
from fedtune.types import Adapter, ClientUpdate


class Strategy(Protocol):
    name: str

    def init_state(self, global_adapter: Adapter) -> State: ...
    def client_config(self, round: int, state: State) -> dict: ...
    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate], state: State) -> tuple[Adapter, State]: ...


REGISTRY = {cls.name: cls for cls in (FedAvg, FedAvgM, FedProx, Scaffold, FedAdagrad, FedAdam, FedYogi)}
assert tuple(REGISTRY) == STRATEGIES  # config.py lists the same names for validation without torch


def build_strategy(name: str, *, aggregator=None, num_clients: Optional[int] = None, **hyper: float) -> Strategy:
    """The strategy registered under ``strategy.name``, with its hyper-parameters (those
    in ``config.STRATEGY_PARAMS[name]``; the rest keep the class defaults) and an aggregator
    (default: the example-weighted mean). ``num_clients`` is what SCAFFOLD divides by."""
    if name not in REGISTRY:
        raise ConfigError(f"strategy.name: '{name}' is not one of {', '.join(REGISTRY)}")
    unused = [k for k in hyper if k not in STRATEGY_PARAMS[name]]
    if unused:
        raise ConfigError([f"strategy.{k}: strategy.name={name} does not use it; remove it" for k in unused])
    cls = REGISTRY[name]
    if cls is Scaffold:
        hyper["num_clients"] = num_clients
    return cls(aggregator=aggregator, **hyper)
