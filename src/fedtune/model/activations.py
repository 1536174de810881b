"""Fewer and smaller activations kept for backward in Llama-form decoder layers, same math.

A training step's memory is mostly what autograd keeps for backward: for SmolLM2-135M at 1,000
tokens under bf16 autocast, 1.1 GB (benchmarks/results/step_memory.json). Three parts of it are
copies the math does not need:

- **The SwiGLU product.** ``act_fn(gate_proj(x)) * up_proj(x)`` keeps ``gate``, ``silu(gate)``
  and ``up`` (three (tokens, intermediate) tensors per layer). :class:`SiluMul` keeps ``gate``
  and ``up`` and recomputes ``silu(gate)`` in backward: the same kernels in the same order, so
  outputs and gradients are bit for bit eager PyTorch's (88 MB less at 1,000 tokens).
- **The norms' float32 outputs.** The residual stream is float32, so a decoder layer's input and
  post-attention RMSNorm return float32. Under autocast every projection they feed casts them
  to bf16, but the LoRA branch keeps the float32 tensor for its weight gradient. Returning the
  autocast dtype from those two norms (:func:`use_lean_activations`) makes the cast once, keeps
  half the bytes (66 MB less) and spares the projections four of five casts. The frozen
  projections' forward computes exactly what it computed before (autocast made the same cast);
  the LoRA A matmul now reads the input as the base projection does, rounded to bf16 (PEFT's own
  LoRA reads it so under autocast too), and backward sums the gradients of the norm's consumers
  in bf16 before the cast back to float32 (before: each cast's float32 gradient, summed in
  float32). Training stays as close to float32 training as before (tested). Outside autocast
  nothing changes. Only where every projection the norms feed is a plain or bf16-stored linear
  layer (not a quantized one, which would return bf16 instead of float32) and no LoRA layer casts
  its input back to float32 (PEFT's own forward, used without dropout, would: a conversion more
  and no memory saved).
- **The LoRA layers' inputs.** A LoRA layer keeps its input for its A gradient: the two norms'
  outputs (read by q/k/v and by gate/up) and ``down_proj``'s input ``silu(gate) * up``, three
  tensors per layer, although each is a cheap function of tensors autograd keeps anyway (the
  norm's input, which the norm keeps for its own backward; ``gate`` and ``up``, which
  :class:`SiluMul` keeps). Those outputs are marked with how to compute them again
  (:func:`recompute_later`, :class:`Recompute`), and the lean LoRA layer (model/lora_dropout.py,
  every adapted layer with dropout) keeps the recipe and its inputs instead. Backward computes
  each again once, with the same kernels under the same autocast state, so the gradients are
  bit for bit those of keeping them (tested, also under gradient checkpointing). For SmolLM2-135M
  that is 235 MB less at 768 float32 tokens (1.09 instead of 1.32 GB kept, weights included) and
  116 MB less under bf16 autocast, for a norm (0.15 ms) and a SiLU product (0.5 ms) per layer in
  backward. Only where the norm keeps its input: a float32 residual stream (CPU, or float32
  weights), not the first layer's input norm (it reads the frozen embedding's output, which
  nothing keeps; under gradient checkpointing the checkpoint keeps it, so that one is computed
  again too) nor bf16-stored residuals on a GPU (the norm keeps a float32 copy instead).
  The marked tensor holds the recipe's inputs while it lives; they are kept for backward anyway.

All are installed only where a module's ``forward`` is, instruction for instruction,
transformers' Llama MLP or decoder layer (Mistral, Qwen2, Qwen3, SmolLM3 copy them); anything
else (sandwich norms, fused gate/up, GELU MLPs, mixtures of experts) keeps its own forward.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Optional

import torch
import torch.nn.functional as F


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` for backward (not ``silu(gate)``)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        # eager autograd of act * up: grad_act = grad * up, grad_up = grad * act, then silu's backward
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (multiplied in place into the SiLU's new tensor: one buffer)."""
    return F.silu(gate).mul_(up)


def swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The Llama MLP's forward with :class:`SiluMul` where autograd records it; a LoRA
    ``down_proj`` keeps how to compute its input again (from ``gate`` and ``up``, which
    :class:`SiluMul` keeps), not the input."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and gate.dtype == up.dtype and (gate.requires_grad or up.requires_grad):
        return self.down_proj(recompute_later(SiluMul.apply(gate, up), silu_mul, gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def to_autocast_dtype(output: torch.Tensor) -> torch.Tensor:
    """A norm's output in autocast's dtype where autocast is on."""
    device = output.device.type
    if torch.is_autocast_enabled(device) and output.is_floating_point():
        return output.to(torch.get_autocast_dtype(device))
    return output


def lean_norm_output(module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a decoder layer's two norms: the output in autocast's dtype where autocast
    is on, and while autograd records, with how to compute it again from the norm's input for
    the LoRA layers it feeds. Only where the norm keeps that input for its own backward: a
    float32 input that needs a gradient (a bf16 one is kept as its float32 copy; the first
    layer's input, the frozen embedding's output, is not kept at all)."""
    output = to_autocast_dtype(output)
    x = args[0]
    if torch.is_grad_enabled() and x.requires_grad and x.dtype == torch.float32:
        recompute_later(output, functools.partial(norm_again, module), x)
    return output


def norm_again(module, x: torch.Tensor) -> torch.Tensor:
    """What :func:`lean_norm_output` returned for ``x``: the norm's own forward, not its call (no
    hook runs twice)."""
    return to_autocast_dtype(module.forward(x))


RECOMPUTE = "_fedtune_recompute"


class Recompute:
    """How to compute a tensor again from tensors autograd keeps anyway: ``fn(*args)`` under the
    autocast state it was first computed in (so the same kernels give the same bits), without
    gradients. It holds no tensor of the forward: the LoRA layer that uses it saves ``args`` with
    ``save_for_backward`` (so gradient checkpointing's hooks see them) and passes them back. The
    value is kept from the first backward that asks for it (q, k and v read one norm output)
    until the last of the ``users`` has asked."""

    __slots__ = ("fn", "device", "autocast", "users", "value")

    def __init__(self, fn, device: str):
        self.fn, self.device = fn, device
        self.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        self.users, self.value = 0, None

    def keep(self) -> "Recompute":
        self.users += 1
        return self

    def tensor(self, *args: torch.Tensor) -> torch.Tensor:
        value = self.value
        if value is None:
            enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(self.device, dtype=dtype, enabled=enabled):
                value = self.fn(*args)
        self.users -= 1
        self.value = value if self.users > 0 else None
        return value


def recompute_later(t: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as ``fn(*args)``, where ``args`` are kept for backward anyway: a LoRA layer that
    reads ``t`` (model/lora_dropout.py) keeps ``args`` and the recipe instead of ``t``. Not under
    ``torch.compile`` (its graphs do not carry tensor attributes); returns ``t``."""
    if not torch.compiler.is_compiling():
        setattr(t, RECOMPUTE, (Recompute(fn, t.device.type), args))
    return t


def recipe_of(t: torch.Tensor) -> tuple[Optional[Recompute], tuple]:
    """(the :class:`Recompute`, its args) ``t`` was marked with, or (None, ())."""
    return getattr(t, RECOMPUTE, (None, ()))


def _code(fn) -> tuple:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return () if code is None else (code.co_code, code.co_names, code.co_consts)


def _llama_forms() -> tuple[tuple, tuple]:
    from transformers.models.llama import modeling_llama

    return _code(modeling_llama.LlamaMLP.forward), _code(modeling_llama.LlamaDecoderLayer.forward)


def _norms_feed_plain(layer) -> bool:
    """Every linear layer in ``layer`` is a plain (or bf16-stored) ``nn.Linear`` and no LoRA layer
    casts its input to its own float32 (see the module's docstring)."""
    from fedtune.model.frozen import LowPrecisionLinear

    for m in layer.modules():
        if isinstance(m, torch.nn.Linear) and type(m) not in (torch.nn.Linear, LowPrecisionLinear):
            return False
        if getattr(m, "cast_input_dtype_enabled", False):
            return False
    return True


def use_lean_activations(model) -> dict[str, int]:
    """Install :func:`swiglu_forward` on every Llama-form SiLU MLP, and :func:`lean_norm_output`
    on the two norms of every Llama-form decoder layer whose MLP is one (so the norms feed
    projections only: no router, no expert sums); returns how many of each."""
    mlp_form, layer_form = _llama_forms()

    def lean_mlp(module) -> bool:
        forward = getattr(type(module), "forward", None)
        return forward is not None and _code(forward) == mlp_form and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")

    done = {"mlp": 0, "norms": 0}
    for module in model.modules():
        if getattr(module, "_fedtune_lean", False):
            continue
        if lean_mlp(module):
            module.forward = types.MethodType(swiglu_forward, module)
            done["mlp"] += 1
        elif _code(type(module).forward) == layer_form and lean_mlp(getattr(module, "mlp", None)) and _norms_feed_plain(module):
            for norm in (module.input_layernorm, module.post_attention_layernorm):
                norm.register_forward_hook(lean_norm_output)
            done["norms"] += 2
        else:
            continue
        module._fedtune_lean = True
    return done
