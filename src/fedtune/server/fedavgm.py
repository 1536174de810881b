"""FedAvgM: FedAvg with server momentum."""

from __future__ import annotations

from typing import Sequence

from fedtune.errors import ConfigError
from fedtune.server.aggregate import Mean, check_updates
from fedtune.server.state import State, filled, pack, unpack
from fedtune.types import Adapter, ClientUpdate


class FedAvgM:
    """FedAvg with server momentum (Hsu et al., "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", 2019):

        Delta_t = aggregate_i(delta_i)
        v_t     = beta * v_{t-1} + Delta_t,     v_0 = 0
        x_{t+1} = x_t + eta * v_t

    (Flower's FedAvgM writes the same with the pseudo-gradient -Delta_t; no Nesterov variant
    here.) With beta = 0 and eta = 1 it is FedAvg. The effective step in a steady direction is
    eta / (1 - beta) times FedAvg's, so lower eta when raising beta.

    State: ``momentum.<key>`` = v.
    """

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, aggregator=None):
        if not server_lr > 0:
            raise ConfigError(f"strategy.server_lr: must be > 0, got {server_lr}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"strategy.momentum: must be in [0, 1), got {momentum}")
        self.server_lr, self.momentum = float(server_lr), float(momentum)
        self.aggregator = aggregator or Mean()

    def init_state(self, global_adapter: Adapter) -> State:
        return pack("momentum", filled(global_adapter, 0.0))

    def client_config(self, round: int, state: State) -> dict:
        return {}

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate], state: State) -> tuple[Adapter, State]:
        step = self.aggregator(check_updates(global_adapter, updates), global_adapter)
        v = unpack("momentum", state, global_adapter)
        v = {k: self.momentum * v[k] + step[k] for k in global_adapter}
        return {k: global_adapter[k] + self.server_lr * v[k] for k in global_adapter}, pack("momentum", v)
