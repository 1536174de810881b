"""The frozen base's adapted projections stored in the compute precision (bf16 on a CPU).

On a CPU the base model loads in float32 and training runs under bf16 autocast. Autocast casts
every projection's weight to bf16 at each forward and keeps that copy for backward (the input
gradient needs it), so a step holds the frozen weights twice: float32 (never trained, never read
at float32 precision inside autocast) and bf16. For SmolLM2-135M that is 0.42 GB of a ~2.5 GB
peak. :func:`store_in` converts the base weight of every adapted ``nn.Linear`` once to the
autocast dtype: under autocast the forward and backward are bit-for-bit those of before (the
cast autocast made is the one made here), and nothing is cast per step.

Only processes that train convert (``setup.build_model(..., training=True)``). Outside
autocast (a run's sample answers) a converted projection casts its input to its weight's
dtype and its output back, so callers still pass and get float32; those answers compute the
projections in bf16, the run's own precision (the base-answer cache keys them apart). Embeddings,
norms and the LM head stay as loaded. Eval, chat, serve and export load the model as it is.

A frozen plain LM head (tied to the float32 embeddings in SmolLM2, so it stays float32) also gets
a copy of its weight in the autocast dtype (:func:`head_weight`), which the loss reads instead of
casting the (V, d) weight for every micro-batch (SmolLM2's 49k x 576 head: 15-20 ms, 1.5% of a bf16
step) or, without gradients, for every chunk of positions (as long as the chunk's matmul). It is the
value autocast's cast gives, so losses and gradients are bit for bit the same; it costs the copy's
bytes (56 MB for SmolLM2) for the process's life. Like the projections, the head never changes in
a process that trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


HEAD_COPY = "fedtune_head_copy"  # the non-persistent buffer holding the head's weight in the compute dtype


class LowPrecisionLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored in a lower precision than its callers'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.to(dtype), self.weight, self.bias).to(x.dtype)


def store_in(peft_model, dtype: torch.dtype) -> int:
    """Convert the frozen float32 base weight (and bias) of every LoRA-adapted plain ``nn.Linear``
    to ``dtype``; returns how many projections changed."""
    from peft.tuners.lora.layer import LoraLayer

    embeddings = peft_model.get_input_embeddings().weight  # an adapted lm_head tied to it stays: the residual stream is float32
    changed = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear or base.weight.dtype != torch.float32 or base.weight.requires_grad or base.weight is embeddings:
            continue
        base.to(dtype)
        base.__class__ = LowPrecisionLinear
        changed += 1
    if changed:  # the float32 weights left (embeddings, norms) out of the model file's memory map, so that the
        for p in peft_model.parameters():  # map, and the float32 pages the conversion read into memory, are released
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.clone()
    head = peft_model.get_output_embeddings()
    if plain_frozen_head(head) and head.weight.dtype == torch.float32 and getattr(head, HEAD_COPY, None) is None:
        head.register_buffer(HEAD_COPY, head.weight.detach().to(dtype), persistent=False)
    return changed


def plain_frozen_head(head) -> bool:
    """A frozen bias-free plain linear LM head (the usual tied or untied head under LoRA; not a
    quantized or adapter-wrapped subclass)."""
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def head_weight(head: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """``head``'s weight in ``dtype``: the copy :func:`store_in` keeps, or cast now."""
    copy = getattr(head, HEAD_COPY, None)
    if copy is not None and copy.dtype == dtype and copy.device == head.weight.device:
        return copy
    return head.weight.to(dtype)


def stored_dtype(model):
    """The dtype :func:`store_in` stored ``model``'s projections in; None if it did not."""
    return next((m.weight.dtype for m in model.modules() if isinstance(m, LowPrecisionLinear)), None)
