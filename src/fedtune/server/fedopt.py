"""The adaptive server optimisers of Reddi et al., "Adaptive Federated Optimization" (ICLR
2021, Algorithm 2): FedAdagrad, FedAdam and FedYogi share everything here and differ only
in how the second moment v is updated (fedadagrad.py, fedadam.py, fedyogi.py).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from fedtune.errors import ConfigError
from fedtune.server.aggregate import Mean, check_updates
from fedtune.server.state import State, filled, pack, unpack
from fedtune.types import Adapter, ClientUpdate


def adaptive_step(
    x: torch.Tensor,
    delta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    server_lr: float,
    beta1: float,
    tau: float,
    second_moment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One server step on one tensor; returns (x_{t+1}, m_t, v_t):

        m_t     = beta1 * m_{t-1} + (1 - beta1) * Delta_t
        v_t     = second_moment(v_{t-1}, Delta_t^2)
        x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)
    """
    m = beta1 * m + (1 - beta1) * delta
    v = second_moment(v, delta * delta)
    return x + server_lr * m / (v.sqrt() + tau), m, v


class FedOpt:
    """Server optimisation on the pseudo-gradient (Reddi et al. 2021, Algorithm 2):

        Delta_t = aggregate_i(delta_i)            the clients' averaged delta
        m_t     = beta1 m_{t-1} + (1 - beta1) Delta_t,          m_{-1} = 0
        v_t     = second_moment(v_{t-1}, Delta_t^2),            v_{-1} = tau^2
        x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

    Exactly the paper's algorithm, with these choices stated:
    - no bias correction of m or v (the paper's Algorithm 2 has none; Flower's FedAdam scales
      eta by sqrt(1 - beta2^t) / (1 - beta1^t) while its FedYogi does not);
    - v starts at tau^2, the smallest start the paper allows (v_{-1} >= tau^2; Flower uses 0);
    - the paper's Delta_t is the uniform average of the client deltas; the default ``mean``
      aggregator weights by examples (the same for equal shards), and any robust
      aggregator may replace it.

    State: ``m.<key>`` and ``v.<key>``.
    """

    name = "fedopt"

    def __init__(self, server_lr: float, beta1: float, beta2: Optional[float], tau: float, aggregator=None):
        problems = []
        if not server_lr > 0:
            problems.append(f"strategy.server_lr: must be > 0, got {server_lr}")
        for key, beta in (("beta1", beta1), ("beta2", beta2)):
            if beta is not None and not 0 <= beta < 1:
                problems.append(f"strategy.{key}: must be in [0, 1), got {beta}")
        if not tau > 0:
            problems.append(f"strategy.tau: must be > 0, got {tau}")
        if problems:
            raise ConfigError(problems)
        self.server_lr, self.beta1, self.beta2, self.tau = float(server_lr), float(beta1), beta2, float(tau)
        self.aggregator = aggregator or Mean()

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # FedAdagrad, FedAdam, FedYogi

    def init_state(self, global_adapter: Adapter) -> State:
        return {**pack("m", filled(global_adapter, 0.0)), **pack("v", filled(global_adapter, self.tau**2))}

    def client_config(self, round: int, state: State) -> dict:
        return {}

    def aggregate(self, global_adapter: Adapter, updates: Sequence[ClientUpdate], state: State) -> tuple[Adapter, State]:
        step = self.aggregator(check_updates(global_adapter, updates), global_adapter)
        m, v = unpack("m", state, global_adapter), unpack("v", state, global_adapter)
        new_x, new_m, new_v = {}, {}, {}
        for k, x in global_adapter.items():
            new_x[k], new_m[k], new_v[k] = adaptive_step(
                x, step[k], m[k], v[k],
                server_lr=self.server_lr, beta1=self.beta1, tau=self.tau, second_moment=self.second_moment,
            )
        return new_x, {**pack("m", new_m), **pack("v", new_v)}
