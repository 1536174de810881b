"""FedProx: FedAvg on the server, a proximal term in every client's local objective."""

from __future__ import annotations

from fedtune.errors import ConfigError
from fedtune.server.fedavg import FedAvg
from fedtune.server.state import State
from fedtune.types import PROX_MU


class FedProx(FedAvg):
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

    Client i minimises, from the global adapter x_t,

        h_i(w) = f_i(w) + mu/2 ||w - x_t||^2        (w: the LoRA tensors only)

    so each local step adds mu (w - x_t) to the gradient of the local loss
    (client/hooks.py); the server aggregates as FedAvg. With mu = 0 it is FedAvg bit for bit.
    No state; ``client_config`` carries mu.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01, aggregator=None):
        if not mu >= 0:
            raise ConfigError(f"strategy.mu: the proximal weight must be >= 0, got {mu}")
        super().__init__(aggregator)
        self.mu = float(mu)

    def client_config(self, round: int, state: State) -> dict:
        return {PROX_MU: self.mu}
