"""Several LoRA adapters on one base model at once: each row of a batch uses its own.

A compare answers the same prompts with five or more adapters. On a CPU a decoding step
costs about the same for 20 rows as for 60 (it reads every weight once either way), so
answering every model's prompts in shared batches takes far fewer steps than one model
after another (model/generate.py).

With the model's own LoRA switched off, a hook on every adapted linear layer adds

    ((x @ [A_1; ...; A_K]^T) * M) @ [B_1, ..., B_K]^T

to the base layer's output, where row i of the mask M holds the layer's LoRA scaling in the
r columns of its adapter and zero elsewhere (all zero: the base model). The A's and B's are
stacked once, so a layer adds three operations whatever K is, and a row's output is its own
adapter's ``x @ A_k^T @ B_k^T * scaling`` (the other blocks add exact zeros). Only plain LoRA
on linear layers is stacked (DoRA, LoRA on embeddings and other variants are refused by
:func:`stackable`; callers then load one adapter at a time).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from fedtune.model.generate import generate
from fedtune.model.lora import adapter_parameters, check_fits, set_adapter
from fedtune.types import Adapter

BASE = -1  # the group of rows answered by the base model (LoRA off)
ADAPTER = "default"


class RowsUnknown(RuntimeError):
    """An adapted layer sees its input without the batch's rows (a mixture-of-experts block
    flattens them), so the rows cannot be told apart there."""


def lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """Qualified name -> PEFT LoRA layer of ``peft_model``, named as the adapter keys name it."""
    from peft.tuners.lora.layer import LoraLayer

    return {name: module for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


def stackable(peft_model) -> bool:
    """True when every LoRA layer is a plain LoRA ``nn.Linear`` (no DoRA, no other variant)."""
    from peft.tuners.lora.layer import Linear

    layers = lora_layers(peft_model)
    return bool(layers) and all(
        type(m) is Linear and ADAPTER in m.lora_A and not m.use_dora.get(ADAPTER, False)
        and not getattr(m, "fan_in_fan_out", False) for m in layers.values()
    )


class RowAdapters:
    """``adapters`` (each fits ``peft_model``'s LoRA; None: the base model) stacked per layer;
    :meth:`route` makes the next forwards give row i the adapter ``groups[i]`` (an index into
    ``adapters``, or :data:`BASE`)."""

    def __init__(self, peft_model, adapters: Sequence[Optional[Adapter]]):
        self.model = peft_model
        self.layers = lora_layers(peft_model)
        params = adapter_parameters(peft_model)
        for adapter in adapters:
            if adapter is not None:
                check_fits(params, adapter)  # one line naming the tensor, as loading it into the model would
        self.adapters: list[Adapter] = []
        self.block: list[Optional[int]] = []  # adapters[i]'s block in the stacks (None: the base model)
        for adapter in adapters:
            self.block.append(None if adapter is None else len(self.adapters))
            self.adapters += [adapter] if adapter is not None else []
        self.stacks = {name: self._stack(name, layer) for name, layer in self.layers.items()} if self.adapters else {}

    def _stack(self, name: str, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """(A of every adapter stacked: (K r, in), B side by side: (out, K r)) of one layer."""
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        own_a, own_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        device = own_a.device
        a = torch.cat([ad[a_key] for ad in self.adapters]).to(device, own_a.dtype)
        b = torch.cat([ad[b_key] for ad in self.adapters], 1).to(device, own_b.dtype)
        return a, b

    def _masks(self, groups: Sequence[int]) -> dict[str, torch.Tensor]:
        """Each layer's (rows, 1, K r) mask; layers of the same rank, scaling and dtype share one."""
        made: dict[tuple, torch.Tensor] = {}
        masks = {}
        for name, (a, _) in self.stacks.items():
            layer = self.layers[name]
            r, scaling = layer.r[ADAPTER], layer.scaling[ADAPTER]
            kind = (r, scaling, a.shape[0], a.dtype, a.device)
            if kind not in made:
                mask = torch.zeros(len(groups), 1, a.shape[0], dtype=a.dtype, device=a.device)
                for row, g in enumerate(groups):
                    block = None if g == BASE else self.block[g]
                    if block is not None:
                        mask[row, 0, block * r:(block + 1) * r] = scaling
                made[kind] = mask
            masks[name] = made[kind]
        return masks

    @contextlib.contextmanager
    def route(self, groups: Sequence[int]) -> Iterator[None]:
        """Within: the model's own adapter is off and row i of every forward gets adapter ``groups[i]``."""
        masks = self._masks(groups)
        hooks = [self.layers[name].register_forward_hook(self._hook(name, mask)) for name, mask in masks.items()]
        try:
            with self.model.disable_adapter():
                yield
        finally:
            for h in hooks:
                h.remove()

    def _hook(self, name: str, mask: torch.Tensor):
        a, b = self.stacks[name]

        def add_rows(module, args, result):
            x = args[0]
            if x.dim() < 3 or x.shape[0] != mask.shape[0]:  # e.g. a mixture-of-experts block's flattened tokens
                raise RowsUnknown(f"row adapters routed {mask.shape[0]} rows; {name} sees input of shape {tuple(x.shape)}")
            with torch.autocast(device_type=x.device.type, enabled=False):  # the rank-r matmuls in the adapter's dtype
                h = F.linear(x.to(a.dtype), a) * mask  # (b, t, K r): each row's own block, scaled
                out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]).to(result.dtype),
                                  b.t().to(result.dtype))
            return out.view(result.shape)

        return add_rows


def stacks(model, adapters: Sequence[Optional[Adapter]]) -> bool:
    """True when ``adapters`` (two or more) can answer in shared batches on ``model``: its LoRA is
    :func:`stackable` and every adapted layer sees the batch's rows (a two-row, two-token
    forward, in eval mode, so no dropout draws from the caller's random generator)."""
    if len(adapters) < 2 or not stackable(model):
        return False
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode(), RowAdapters(model, adapters[:2]).route([0, 1]):
            model(input_ids=torch.zeros(2, 2, dtype=torch.long, device=device))
        return True
    except RowsUnknown:
        return False
    finally:
        model.train(was_training)


def answer_each(model, params: dict, adapters: Sequence[Optional[Adapter]], tokenizer, prompts: Sequence[str], *,
                inputs: Sequence[str], **kwargs) -> list[list[str]]:
    """Every adapter's (None: the base model's) greedy answers to ``prompts``, formatted as
    :func:`~fedtune.model.generate.generate` (``kwargs``: its options). All adapters answer in
    shared batches where the model's LoRA stacks; else one after another, each copied into
    ``params`` (the model's live adapter), which then holds the last one."""
    n = len(prompts)
    if not n:
        return [[] for _ in adapters]
    if stacks(model, adapters):
        rows = RowAdapters(model, adapters)
        flat = generate(model, tokenizer, list(prompts) * len(adapters), inputs=list(inputs) * len(adapters),
                        groups=[k for k in range(len(adapters)) for _ in range(n)], route=rows.route, **kwargs)
        return [flat[k * n:(k + 1) * n] for k in range(len(adapters))]
    answers = []
    for adapter in adapters:
        if adapter is not None:
            set_adapter(params, adapter)
        with model.disable_adapter() if adapter is None else contextlib.nullcontext():
            answers.append(generate(model, tokenizer, prompts, inputs=inputs, **kwargs))
    return answers
