"""Supervised fine-tuning of the global adapter on one client's examples.

One :class:`LocalTrainer` serves every client of a process: it holds the shared PEFT model,
its LoRA parameters and one AdamW optimizer whose state is cleared at the start of each fit
(a fresh optimizer per client per round, as in FedIT), so no model or trainer is rebuilt.
With ``packing`` each micro-batch is one row of its examples back to back (no padding;
each example attends only to itself: model/attention.py).
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from fedtune.client.hooks import LocalTerms
from fedtune.client.optim import AdapterOptimizer, dropout_rng, warmup_lr
from fedtune.data.batching import plan_steps, split_steps
from fedtune.data.prompts import Encoded, collate, pack, to_device
from fedtune.model.forward import sequence_nll
from fedtune.model.lora import get_adapter, set_adapter
from fedtune.seeding import generator
from fedtune.server.hetlora import client_view
from fedtune.types import Adapter, ClientUpdate

StepCallback = Callable[[int, int, float], None]  # (step, total_steps, loss)


class LocalTrainer:
    """Local training loop (AdamW, linear warm-up, gradient accumulation, clipping)."""

    def __init__(
        self,
        model,
        params: dict[str, torch.nn.Parameter],
        *,
        pad_id: int,
        batch_size: int,
        grad_accum: int = 1,
        local_epochs: int = 1,
        local_steps: Optional[int] = None,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        by_length: bool = True,
        max_tokens: Optional[int] = None,
        packing: bool = False,
        precision: str = "fp32",
        seed: int = 0,
        compile: bool = False,
    ):
        self.model, self.params, self.max_tokens, self.packing = model, params, max_tokens, packing
        self.pad_id, self.batch_size, self.grad_accum = pad_id, batch_size, grad_accum
        self.local_epochs, self.local_steps, self.warmup_steps = local_epochs, local_steps, warmup_steps
        self.max_grad_norm, self.by_length, self.seed = max_grad_norm, by_length, seed
        self.device = next(iter(params.values())).device
        self.optimizer = AdapterOptimizer(params, weight_decay=weight_decay, max_grad_norm=max_grad_norm, precision=precision)
        # torch.compile of the forward (train.compile); dynamic: packed rows differ in length every micro-batch
        self.nll = torch.compile(sequence_nll, dynamic=True) if compile else sequence_nll

    def plan(
        self, client_id: int, round: int, examples: Sequence[Encoded], local_steps: Optional[int] = None
    ) -> list[list[list[int]]]:
        """The client's optimizer steps this round (positions into ``examples``);
        ``local_steps`` overrides the trainer's own (heterogeneous clients, or
        the centralized baseline's per-round budget). Micro-batches over ``max_tokens``
        tokens (with padding unless packed) are cut into smaller ones (same step, same gradient)."""
        rng = generator(self.seed, "batches", round, client_id)
        lengths = [int(e.input_ids.numel()) for e in examples]
        steps = plan_steps(
            lengths, self.batch_size, self.grad_accum, rng,
            epochs=self.local_epochs, max_steps=self.local_steps if local_steps is None else local_steps, by_length=self.by_length,
        )
        return split_steps(steps, lengths, self.max_tokens, packed=self.packing)

    def fit(
        self,
        client_id: int,
        examples: Sequence[Encoded],
        global_adapter: Adapter,
        *,
        round: int,
        lr: float,
        client_config: Optional[dict] = None,
        client_control: Optional[Adapter] = None,
        local_steps: Optional[int] = None,
        rank: Optional[int] = None,
        on_step: Optional[StepCallback] = None,
    ) -> ClientUpdate:
        """Train from ``global_adapter`` on ``examples``; return the adapter delta.

        ``client_config`` is what the strategy tells clients this round (empty for FedAvg;
        FedProx's mu, SCAFFOLD's server control variate: client/hooks.py);
        ``client_control`` is this client's own SCAFFOLD variate c_i (None: zeros), and the
        update then carries its change in ``control_delta``. A client of ``rank`` < lora.r
        (HetLoRA) starts from the global adapter truncated to that rank and trains only
        those slices; its delta is relative to the truncated adapter."""
        start = time.perf_counter()
        global_adapter, mask = client_view(global_adapter, rank)  # HetLoRA: only the first ``rank`` slices
        set_adapter(self.params, global_adapter)
        self.optimizer.reset(mask)
        terms = LocalTerms.build(global_adapter, client_config, client_control, self.device)
        steps = self.plan(client_id, round, examples, local_steps)
        self.model.train()
        nll_sum = torch.zeros((), device=self.device)
        tokens = real = padded = 0
        with dropout_rng(self.seed, round, client_id, self.device):
            for i, step in enumerate(steps):
                batches = [self.make_batch([examples[j] for j in micro]) for micro in step]
                step_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
                step_nll = self._step(batches, step_tokens, warmup_lr(lr, i, self.warmup_steps), terms)
                nll_sum += step_nll
                tokens += step_tokens
                real += sum(int(examples[j].input_ids.numel()) for micro in step for j in micro)
                padded += sum(b["input_ids"].numel() for b in batches)
                if on_step is not None:
                    on_step(i + 1, len(steps), float(step_nll) / max(step_tokens, 1))
        local = get_adapter(self.params)
        delta = {k: local[k] - global_adapter[k] for k in local}
        metrics = {
            "loss": float(nll_sum) / max(tokens, 1),
            "steps": len(steps),
            "tokens": tokens,
            "real_tokens": real,
            "padded_tokens": padded,
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }
        control_delta = terms.control_delta() if terms is not None else None
        return ClientUpdate(client_id, len(examples), delta, metrics, control_delta)

    def make_batch(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        """One micro-batch: packed into a single row (no padding), or right-padded."""
        return pack(items) if self.packing else collate(items, self.pad_id)

    def _step(self, batches: list[dict], step_tokens: int, lr: float, terms: Optional[LocalTerms] = None) -> torch.Tensor:
        """One optimizer step over ``batches`` (gradient accumulation); returns the summed NLL."""
        total = torch.zeros((), device=self.device)
        for batch in batches:
            batch = to_device(batch, self.device)
            with self.optimizer.autocast():
                nll, _ = self.nll(self.model, **batch)  # (b,)
            loss = nll.sum() / max(step_tokens, 1)  # mean over every labelled token of the step
            self.optimizer.backward(loss)
            total += nll.detach().sum()
        self.optimizer.step(lr, terms)
        return total
