"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021)."""

from __future__ import annotations

import torch

from fedtune.server.fedopt import FedOpt


class FedYogi(FedOpt):
    """FedOpt (fedopt.py: momentum m, step eta m / (sqrt(v) + tau), no bias correction,
    v_{-1} = tau^2) with Yogi's second moment (Zaheer et al., NeurIPS 2018), an additive
    update that moves v towards Delta^2 by at most (1 - beta2) Delta^2 per round:

        v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)

    Note v_{t-1} itself is not multiplied by beta2: that is Adam's decay, not Yogi's rule.
    """

    name = "fedyogi"

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, aggregator=None):
        super().__init__(server_lr, beta1, beta2, tau, aggregator)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)
