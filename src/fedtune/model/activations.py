"""Fewer and smaller activations kept for backward in Llama-form decoder layers, same math.

A training step's memory is mostly what autograd keeps for backward: for SmolLM2-135M at 1,000
tokens under bf16 autocast, 1.1 GB (benchmarks/results/step_memory.json). Two parts of it are
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

Both are installed only where a module's ``forward`` is, instruction for instruction,
transformers' Llama MLP or decoder layer (Mistral, Qwen2, Qwen3, SmolLM3 copy them); anything
else (sandwich norms, fused gate/up, GELU MLPs, mixtures of experts) keeps its own forward.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` for backward (not ``silu(gate)``)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        # eager autograd of act * up: grad_act = grad * up, grad_up = grad * act, then silu's backward
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The Llama MLP's forward with :class:`SiluMul` where autograd records it."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and gate.dtype == up.dtype and (gate.requires_grad or up.requires_grad):
        return self.down_proj(SiluMul.apply(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def to_autocast_dtype(module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: a norm's output in autocast's dtype where autocast is on."""
    device = output.device.type
    if torch.is_autocast_enabled(device) and output.is_floating_point():
        return output.to(torch.get_autocast_dtype(device))
    return output


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
    """Install :func:`swiglu_forward` on every Llama-form SiLU MLP, and :func:`to_autocast_dtype`
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
                norm.register_forward_hook(to_autocast_dtype)
            done["norms"] += 2
        else:
            continue
        module._fedtune_lean = True
    return done
