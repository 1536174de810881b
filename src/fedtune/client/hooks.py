"""What FedProx and SCAFFOLD change in local training: terms added to the gradient of the
local loss once per optimizer step, after backward (and fp16 unscaling) and before gradient
clipping and the optimizer, so that clipping and AdamW see the gradient of the strategy's
local objective. The strategy's ``client_config`` switches them on (``types.PROX_MU``,
``types.SERVER_CONTROL``); with neither, local training is plain FedAvg training.

FedProx (Li et al., MLSys 2020): the local objective is f_i(w) + mu/2 ||w - x||^2 over the
LoRA tensors w, with x the global adapter of the round, so

    g <- g + mu (w - x)

SCAFFOLD (Karimireddy et al., ICML 2020), client side with server variate c and client
variate c_i:

    g <- g - c_i + c                                  (corrected gradient)
    c_i^+ = (1/K) sum_{k=1..K} g_k                    (K optimizer steps, g_k uncorrected)

The paper's option II is c_i^+ = c_i - c + (x - y_i) / (K eta_l). Under plain SGD with a
constant local lr eta_l, y_i = x - eta_l sum_k (g_k - c_i + c), so option II equals the
mean of the uncorrected gradients along the local trajectory exactly (tests/client/
test_hooks.py checks this). We use that form because it stays a gradient estimate under
AdamW, warm-up and clipping, where (x - y_i) / (K eta_l) would measure Adam's normalised
steps instead of gradients. The client returns Delta c_i = c_i^+ - c_i.
"""

from __future__ import annotations

from typing import Optional

import torch

from fedtune.types import PROX_MU, SERVER_CONTROL, Adapter


class LocalTerms:
    """The FedProx and/or SCAFFOLD terms of one client fit, on the trainer's device."""

    def __init__(self, global_adapter: Adapter, client_config: dict, client_control: Optional[Adapter], device: torch.device):
        self.mu: Optional[float] = client_config.get(PROX_MU)
        self.anchor = {k: v.to(device) for k, v in global_adapter.items()} if self.mu is not None else None
        server_control = client_config.get(SERVER_CONTROL)
        self.client_control = None
        self.correction = self.grad_sum = None
        if server_control is not None:
            own = client_control if client_control is not None else {k: torch.zeros_like(v) for k, v in server_control.items()}
            self.client_control = own
            self.correction = {k: (server_control[k] - own[k]).to(device) for k in server_control}  # c - c_i
            self.grad_sum = {k: torch.zeros_like(v) for k, v in self.correction.items()}
        self.steps = 0

    @staticmethod
    def build(global_adapter: Adapter, client_config: Optional[dict], client_control: Optional[Adapter], device) -> Optional["LocalTerms"]:
        """The terms the strategy asks for, or None when it asks for none (FedAvg)."""
        if not client_config or (PROX_MU not in client_config and SERVER_CONTROL not in client_config):
            return None
        return LocalTerms(global_adapter, client_config, client_control, device)

    def apply(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Add the terms to ``p.grad`` of every LoRA parameter (once per optimizer step)."""
        self.steps += 1
        for k, p in params.items():
            if p.grad is None:  # the step did not reach this tensor: its loss gradient is zero
                p.grad = torch.zeros_like(p)
            if self.grad_sum is not None:
                self.grad_sum[k] += p.grad
                p.grad += self.correction[k]
            if self.mu is not None:
                p.grad.add_(p.detach() - self.anchor[k], alpha=self.mu)

    def control_delta(self) -> Optional[Adapter]:
        """SCAFFOLD's Delta c_i = c_i^+ - c_i on CPU (None without SCAFFOLD); c_i^+ = c_i
        when the client made no step."""
        if self.grad_sum is None:
            return None
        if self.steps == 0:
            return {k: torch.zeros_like(v) for k, v in self.client_control.items()}
        return {k: (g / self.steps).cpu() - self.client_control[k] for k, g in self.grad_sum.items()}
