"""FedAvg: the clients' aggregated delta is the server step."""

from __future__ import annotations

from typing import Sequence

from fedtune.server.aggregate import Mean, check_updates
from fedtune.server.state import State
from fedtune.types import Adapter, ClientUpdate


class FedAvg:
    """Federated averaging (McMahan et al., "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017), on adapter deltas:

        x_{t+1} = x_t + Delta_t,   Delta_t = aggregate_i(delta_i),  delta_i = x_i^local - x_t

    With the default ``mean`` aggregator Delta_t = sum_i (n_i / n) delta_i, which makes
    x_{t+1} the example-weighted average of the clients' local adapters. No state.
    """

    name = "fedavg"

    def __init__(self, aggregator=None):
        self.aggregator = aggregator or Mean()

    def init_state(self, global_adapter: Adapter) -> State:
        return {}

    def client_config(self, round: int, state: State) -> dict:
        return {}

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate], state: State) -> tuple[Adapter, State]:
        step = self.aggregator(check_updates(global_adapter, updates), global_adapter)
        return {k: global_adapter[k] + step[k] for k in global_adapter}, state
