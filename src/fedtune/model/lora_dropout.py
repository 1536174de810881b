"""LoRA with input dropout that is fast on CPU and keeps one bit per input element for backward.

PEFT computes ``lora_B(lora_A(dropout(x))) * scaling`` with ``nn.Dropout``. On CPU that
dropout is slow (``bernoulli_`` draws one float per element: ~5 ms for a 4x200x576
activation on 2 cores, 210 times per step for SmolLM2 with all-linear LoRA: about a quarter
of a training step), and autograd keeps the dropped-out copy of ``x`` (4 bytes per element)
plus its mask for every adapted layer, although q/k/v and gate/up share one input.

:class:`LoraDelta` computes the same function with an explicit backward: the keep-mask comes
from 16 random bits per element (the generator's raw output, 4x cheaper than ``bernoulli_``;
``p`` is rounded to a multiple of 1/65536), and backward keeps only ``x`` (shared with the base
layer and the other adapters; where ``x`` is marked as computable again from tensors kept anyway,
model/activations.py ``recompute_later``, those tensors instead), the rank-r activation
``x_drop @ A^T`` and the mask packed eight elements to a byte (:func:`pack_bits`), recomputing the
dropped-out input where it needs it. For SmolLM2 with all-linear LoRA a mask is 4,992 elements
per token and layer: one byte each kept 115 MB of a 768-token step, packed they keep 14 MB.
Packing and unpacking cost 25 + 43 us per 358 x 576 mask on a Zen 4 EPYC, against ~250 us to
draw it again from the generator state it came from, which the bf16 path did before instead of
keeping it (interleaved 358-token bf16 steps: 1.39 s drawing again, 1.31 s packed, 1.31 s with
one-byte masks). ``x`` stays in the dtype it came in (bf16 under autocast: PEFT's cast to the
adapter's fp32 would keep a second, fp32 copy for backward, e.g. 6 MB of each down_proj's 1,024 x
1,536 input). Under autocast the rank-r matmuls run in autocast's dtype with A and B cast to it,
as PEFT's own LoRA does under autocast: no full-width input or gradient is converted to float32
(those conversions were 15% of a bf16 SmolLM2 step), and the adapter's gradients come back in
float32. The adapter math is PEFT's: outputs and gradients equal ``result + (x * keep / (1 - p))
@ A^T @ B^T * scaling`` for the same mask (tested against that formula in float64 and float32,
and against PEFT's own layer without dropout; under autocast both round in bf16, in different
orders).

It is installed as a PEFT ``LoraVariant`` on every adapted ``nn.Linear`` whose dropout is
positive; layers without dropout keep PEFT's own forward. The random bits come from torch's
default generator, so a seeded client step draws the same masks on every run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fedtune.model.activations import recipe_of

BITS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean tensor of ``shape``: True with probability 1 - p (p in steps of 1/65536)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)  # 64 random bits each
    halves = words.view(torch.int16)[:n]  # four 16-bit draws per word, uniform on [-32768, 32767]
    threshold = round(p * BITS) - BITS // 2
    return (halves >= threshold).view(shape)


# 64-bit constants of the packing (little-endian bytes; as signed int64 where the top bit is set)
GATHER = 0x0102040810204080  # byte i (0 or 1) of a word times this lands in bit 56 + i, no two terms on one bit
SPREAD = 0x0101010101010101  # a byte times this is that byte in all eight
SELECT = 0x8040201008040201 - (1 << 64)  # bit i of byte i
LOW7, HIGH = 0x7F7F7F7F7F7F7F7F, 0x8080808080808080 - (1 << 64)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A boolean mask's elements eight to a byte: uint8 (ceil(n / 8),), element i (in row-major
    order) in bit i % 8. Each 8 mask bytes are read as one 64-bit word and gathered by one
    multiplication (25 us for a 358 x 576 mask, a fifth of summing weighted bytes)."""
    if keep.dtype != torch.bool:
        raise TypeError(f"pack_bits packs a boolean mask, not {keep.dtype}")
    flat = keep.reshape(-1).contiguous().view(torch.uint8)  # (n,); a strided mask's reshape may be a strided view
    if flat.numel() % 8 or flat.storage_offset() % 8:  # a fresh copy, zero-padded to whole 64-bit words
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(torch.int64) * GATHER).bitwise_right_shift_(56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """:func:`pack_bits`' mask back, as uint8 0/1 of ``shape``: each byte spread over a word,
    bit i kept in byte i, and every nonzero byte turned into 1 (adding 0x7F sets its top bit)."""
    words = packed.to(torch.int64).mul_(SPREAD).bitwise_and_(SELECT).add_(LOW7).bitwise_and_(HIGH)
    return words.bitwise_right_shift_(7).bitwise_and_(SPREAD).view(torch.uint8)[: math.prod(shape)].view(shape)


class LoraDelta(torch.autograd.Function):
    """``result + (dropout(x) @ A^T) @ B^T * scaling`` with a given keep-mask (None: no dropout).

    The mask multiplies as 0/1 in the adapter's dtype (:func:`_dropped`), the 1/(1-p) and LoRA
    scaling factors are applied to the rank-r tensors, and the last matmul adds into
    ``result`` (one ``addmm``): no full-width multiply or add besides the mask."""

    @staticmethod
    def forward(ctx, result, x, weight_a, weight_b, keep, factor: float):
        h = F.linear(_dropped(x, keep, weight_a.dtype), weight_a) * factor  # (..., r)
        out = torch.addmm(_rows(result), _rows(h).to(result.dtype), weight_b.t().to(result.dtype))
        again, inputs = recipe_of(x)  # x computed again from tensors kept anyway (model/activations.py), or x
        again = again if again is not None and any(ctx.needs_input_grad) else None
        needs_mask = keep is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])  # only x's and A's gradients read it
        ctx.save_for_backward(weight_a, weight_b, pack_bits(keep) if needs_mask else None, h, *(inputs if again else (x,)))
        ctx.factor, ctx.again = factor, again.keep() if again else None
        return out.view(result.shape)

    @staticmethod
    @once_differentiable  # x computed again without a graph: no second derivative through it
    def backward(ctx, grad_out):
        weight_a, weight_b, packed, h, *inputs = ctx.saved_tensors
        x = ctx.again.tensor(*inputs) if ctx.again is not None else inputs[0]
        keep = None if packed is None else unpack_bits(packed, x.shape)
        grad = _rows(grad_out).to(weight_b.dtype)  # (n, out)
        grad_b = grad.t() @ _rows(h) if ctx.needs_input_grad[3] else None
        grad_h = (grad @ weight_b) * ctx.factor  # (n, r)
        grad_a = grad_h.t() @ _rows(_dropped(x, keep, weight_a.dtype)) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = _dropped(grad_h @ weight_a, keep, weight_a.dtype).to(x.dtype).view(x.shape)
        return grad_out, grad_x, grad_a, grad_b, None, None


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _dropped(t: torch.Tensor, keep, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype) * keep`` (a bool, or :func:`unpack_bits`' uint8, mask of ``t``'s shape), the
    same values, with one temporary fewer: the mask is converted to ``dtype`` first and the
    product made in place in a tensor of our own (the converted mask, or where ``t`` comes in
    another dtype its converted copy), never in ``t``. ``t * uint8_mask`` converts the mask
    inside the multiply into a temporary and writes the product into another: 90 us against
    19 + 23 us for a 768 x 576 float32 ``t`` on a Zen 4 EPYC, the same in bf16."""
    if keep is None:
        return t.to(dtype)
    factor = keep.view(torch.uint8).to(dtype).view(t.shape)
    return factor.mul_(t) if t.dtype == dtype else t.to(dtype).mul_(factor)


def lora_forward(result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                 p: float, scaling: float, training: bool) -> torch.Tensor:
    """``result`` plus the LoRA branch's output for input ``x`` (dropout ``p`` while ``training``)."""
    keep, keep_scale = None, 1.0
    if training and p > 0:
        keep, keep_scale = keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p)
    device = x.device.type
    if torch.is_autocast_enabled(device):  # the rank-r matmuls in autocast's dtype, as PEFT's LoRA under autocast;
        dtype = torch.get_autocast_dtype(device)  # the casts' backward returns float32 gradients to the adapter
        weight_a, weight_b = weight_a.to(dtype), weight_b.to(dtype)
    with torch.autocast(device_type=device, enabled=False):  # LoraDelta picks its dtypes itself
        return LoraDelta.apply(result, x, weight_a, weight_b, keep, keep_scale * scaling)


def _variant_class():
    from peft.tuners.lora.layer import LoraVariant

    class LeanDropoutVariant(LoraVariant):
        """PEFT LoRA with :func:`lora_forward` as the forward; merging is plain LoRA's."""

        @staticmethod
        def init(module, adapter_name: str, **kwargs) -> None:
            pass

        @staticmethod
        def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
            return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

        @staticmethod
        def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
            orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

        @staticmethod
        def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
            return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

        @staticmethod
        def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
            dropout = module.lora_dropout[active_adapter]
            return lora_forward(
                result, x, module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight,
                dropout.p, module.scaling[active_adapter], dropout.training,
            )

    return LeanDropoutVariant


def use_lean_dropout(peft_model, adapter_name: str = "default") -> int:
    """Route every plain LoRA ``nn.Linear`` with dropout > 0 through :func:`lora_forward`;
    returns how many layers changed (0 where this PEFT version has no LoRA variants)."""
    from peft.tuners.lora.layer import Linear

    try:
        variant = _variant_class()
    except ImportError:
        return 0
    changed = 0
    for module in peft_model.modules():
        if type(module) is not Linear or adapter_name not in module.lora_A:
            continue
        dropout = module.lora_dropout[adapter_name]
        variants = getattr(module, "lora_variant", None)
        if variants is None or adapter_name in variants or not isinstance(dropout, torch.nn.Dropout) or dropout.p <= 0:
            continue
        if getattr(module, "fan_in_fan_out", False):
            continue
        variants[adapter_name] = variant()
        # LoraDelta casts x to the adapter's dtype itself and keeps x as it came: under bf16
        # autocast PEFT's own cast would keep an fp32 copy of o_proj's and down_proj's inputs
        module.cast_input_dtype_enabled = False
        changed += 1
    return changed
