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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    return changed


def stored_dtype(model):
    """The dtype :func:`store_in` stored ``model``'s projections in; None if it did not."""
    return next((m.weight.dtype for m in model.modules() if isinstance(m, LowPrecisionLinear)), None)
