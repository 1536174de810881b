"""The optimizer-step mechanics every local trainer (SFT, DPO) shares.

AdamW over the LoRA parameters, with its state cleared at the start of each fit (a fresh
optimizer per client per round, as in FedIT); a linear warm-up within the fit; mixed
precision (autocast, and loss scaling for fp16); gradient clipping; and the seeded RNG that
makes LoRA dropout the same for a (round, client) on every run and after every resume.
Each trainer keeps its own loss and step loop and calls these pieces.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from fedtune.client.hooks import LocalTerms
from fedtune.seeding import torch_seed

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``lr * min(1, (step + 1) / (warmup + 1))``."""
    return lr * min(1.0, (step + 1) / (warmup_steps + 1))


class AdapterOptimizer:
    """AdamW over the adapter parameters, with backward/step for one precision."""

    def __init__(self, params: dict[str, torch.nn.Parameter], *, weight_decay: float, max_grad_norm: float, precision: str):
        self.named = params
        self.params = list(params.values())
        self.max_grad_norm = max_grad_norm
        self.device = self.params[0].device
        self.dtype = AUTOCAST[precision]
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.adamw = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=weight_decay)

        self.mask: Optional[dict[str, torch.Tensor]] = None

    def reset(self, rank_mask: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Forget the moments of the previous fit; with ``rank_mask`` (HetLoRA,
        server/hetlora.py) only the masked-in rank slices train in this fit."""
        self.adamw.state.clear()
        self.adamw.zero_grad(set_to_none=True)
        self.mask = None if rank_mask is None else {k: m.to(self.device) for k, m in rank_mask.items()}

    def autocast(self):
        """The forward's precision context (a no-op in fp32)."""
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, lr: float, terms: Optional[LocalTerms] = None) -> None:
        """Add the strategy's gradient ``terms`` (FedProx/SCAFFOLD, client/hooks.py), clip the
        accumulated gradients, take one AdamW step at ``lr`` and clear the gradients."""
        for group in self.adamw.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.adamw)
        if terms is not None:
            terms.apply(self.named)
        if self.mask is not None:  # rank slices beyond the client's rank get no gradient, so stay zero
            for k, p in self.named.items():
                if p.grad is not None:
                    p.grad.mul_(self.mask[k])
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.adamw)
            self.scaler.update()
        else:
            self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)


@contextmanager
def dropout_rng(seed: int, round: int, client: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG (LoRA dropout) from (seed, round, client) inside, restore the caller's after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(torch_seed(seed, "torch", round, client))
        yield
