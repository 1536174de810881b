"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021)."""

from __future__ import annotations

import torch

from fedtune.server.fedopt import FedOpt


class FedAdam(FedOpt):
    """FedOpt (fedopt.py: momentum m, step eta m / (sqrt(v) + tau), no bias correction,
    v_{-1} = tau^2) with Adam's second moment, an exponential average:

        v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2
    """

    name = "fedadam"

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, aggregator=None):
        super().__init__(server_lr, beta1, beta2, tau, aggregator)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta_sq
