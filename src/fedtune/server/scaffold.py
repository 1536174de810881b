"""SCAFFOLD: control variates correct the client drift of local training."""

from __future__ import annotations

from typing import Sequence

from fedtune.errors import AggregationError, ConfigError
from fedtune.server.aggregate import Mean, check_tensors, check_updates
from fedtune.server.state import State, filled, pack, unpack
from fedtune.types import SERVER_CONTROL, Adapter, ClientUpdate


class Scaffold:
    """SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
    Federated Learning", ICML 2020), server side. Each round the server sends x_t and its
    control variate c; client i trains with corrected gradients g - c_i + c, and returns
    delta_i = y_i - x_t and Delta c_i = c_i^+ - c_i (client/hooks.py: option II). Then

        x_{t+1} = x_t + eta_g * aggregate_i(delta_i)
        c_{t+1} = c_t + (1/N) * sum_{i in S} Delta c_i          N = all clients, S = this round's

    which keeps c equal to the mean of all N client variates (all start at 0).

    Deviations from the paper, both choices of the aggregator: with the default ``mean`` the
    deltas are weighted by examples (the paper averages them uniformly; the same when shards
    are equal), and a robust aggregator applies to the deltas only. The control update is
    always the plain sum above, since the invariant c = mean_i c_i needs every Delta c_i.
    With zero control variates (round 1) and eta_g = 1 it is FedAvg bit for bit.

    State: ``control.<key>`` = c.
    """

    name = "scaffold"

    def __init__(self, num_clients: int, server_lr: float = 1.0, aggregator=None):
        if not (isinstance(num_clients, int) and num_clients >= 1):
            raise ConfigError(f"partition.num_clients: SCAFFOLD needs the number of clients, got {num_clients!r}")
        if not server_lr > 0:
            raise ConfigError(f"strategy.server_lr: must be > 0, got {server_lr}")
        self.num_clients, self.server_lr = num_clients, float(server_lr)
        self.aggregator = aggregator or Mean()

    def init_state(self, global_adapter: Adapter) -> State:
        return pack("control", filled(global_adapter, 0.0))

    def client_config(self, round: int, state: State) -> dict:
        return {SERVER_CONTROL: unpack("control", state)}

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate], state: State) -> tuple[Adapter, State]:
        updates = check_updates(global_adapter, updates)
        for u in updates:
            if u.control_delta is None:
                raise AggregationError(f"client {u.client_id}: sent no control variate change; SCAFFOLD clients must")
            check_tensors(global_adapter, u.control_delta, f"client {u.client_id}", "control variate")
        step = self.aggregator(updates, global_adapter)
        c = unpack("control", state, global_adapter)
        new_c = {k: c[k] + sum(u.control_delta[k] for u in updates) / self.num_clients for k in global_adapter}
        return {k: global_adapter[k] + self.server_lr * step[k] for k in global_adapter}, pack("control", new_c)
