"""FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021)."""

from __future__ import annotations

import torch

from fedtune.server.fedopt import FedOpt


class FedAdagrad(FedOpt):
    """FedOpt (fedopt.py: momentum m, step eta m / (sqrt(v) + tau), no bias correction,
    v_{-1} = tau^2) with the Adagrad second moment, a running sum:

        v_t = v_{t-1} + Delta_t^2
    """

    name = "fedadagrad"

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3, aggregator=None):
        super().__init__(server_lr, beta1, None, tau, aggregator)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq
