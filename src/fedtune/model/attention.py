"""Attention over packed rows: several examples in one row, each attending only to itself.

Packing a micro-batch into one row removes padding from every matmul, but plain SDPA over a
packed row either mixes the examples (no mask) or, with a block-diagonal mask, computes the
full row x row score matrix (4x the work for four examples). Flash-attention's varlen kernels
solve this on CUDA; on CPU there is none. Here the packed row's queries, keys and values are
split at the example boundaries and SDPA runs causally on each piece: exact per-example
attention, no padding, no wasted scores.

On a CPU, attention under bf16/fp16 (autocast's dtype or the inputs') over at most
``FLOAT32_UP_TO`` keys runs in float32 and its output is cast back (:func:`in_float32`).
PyTorch's low-precision CPU flash-attention is slower there: forward + backward of one SmolLM2
layer took 1.6-1.7x as long for examples up to 160 tokens, 1.1-1.2x at 192-256 and about the
same at 384 (Zen 4 EPYC without AMX, 2 cores; ``python -m benchmarks.attention``,
benchmarks/results/attention.json); from ~512 tokens it is the faster one (43 vs 54 ms at
1,024), so longer examples keep it. It also builds (and keeps, in an unbounded cache) brgemm
kernels for every sequence length it meets: with packed rows of ever-new example lengths a bf16
run's memory grew ~10 MB per step without end (benchmarks/results/shape_memory.json). So an
example it runs is zero-padded at its end to a multiple of ``CPU_LOW_PRECISION_MULTIPLE``
tokens and cut back after (exact: attention is causal, so a real query never sees the pad keys
after it, and the pad queries' outputs and gradients are dropped), a bounded set of shapes; the
float32 kernel keeps nothing per length. Numerically, float32 attention differs from the
low-precision kernel in that under CPU autocast the queries and keys (which arrive in float32,
promoted by the rotary tables) and their gradients are not rounded to bf16, nor are the
probabilities before they weight the values; the output is rounded to the low precision in both.

A packed row may also carry ``fedtune_prefix``: the keys and values, per layer, of tokens
that every example of the row starts with (a chat template's system prompt) and that were
cut off before packing (evaluation/heldout.py). Each example's keys and values are put behind
them, with zero queries at the prefix positions whose outputs are dropped, so the same causal
kernel attends exactly as if the prefix were still in front of the example.

The function is registered with transformers' attention interface as ``fedtune_sdpa``; it
is plain SDPA unless the forward call carries ``fedtune_segments`` (the example lengths of
a packed row, see ``data.prompts.pack``), so generation and padded batches run plain SDPA (up to
``FLOAT32_UP_TO`` keys in float32 on a CPU, as above).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NAME = "fedtune_sdpa"
SEGMENTS = "fedtune_segments"
PREFIX = "fedtune_prefix"
FLOAT32_UP_TO = 384  # keys: on a CPU, low-precision attention over at most this many runs in float32
CPU_LOW_PRECISION_MULTIPLE = 16


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None, **kwargs):
    """transformers attention function: (b, heads, t, d) in, (b, t, heads, d) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = kwargs.pop(SEGMENTS, None)
    prefix = kwargs.pop(PREFIX, None)
    low = cpu_low_precision(query)
    if segments is None:
        plain = lambda *a, **k: sdpa_attention_forward(*a, **k)[0]  # noqa: E731  (SDPA returns no weights)
        return in_float32(plain, low, key.shape[2], module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs), None
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError("packed attention needs one packed row and no KV cache")
    lengths = segments.tolist()
    gqa = query.shape[1] != key.shape[1]
    before_k, before_v = prefix[module.layer_idx] if prefix is not None else (None, None)

    def attend(q, k, v):
        start = 0
        if before_k is not None:  # the prefix in front, with zero queries whose outputs are dropped: plain causal attention
            start = before_k.shape[2]
            q = torch.cat([q.new_zeros(q.shape[0], q.shape[1], start, q.shape[3]), q], 2)
            k, v = torch.cat([before_k.to(k.dtype), k], 2), torch.cat([before_v.to(v.dtype), v], 2)
        n = q.shape[2]
        pad = -n % CPU_LOW_PRECISION_MULTIPLE if low is not None and not runs_in_float32(low, n) else 0
        if pad:  # zeros after the example's end: causal, so no real query attends to them
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        out = in_float32(F.scaled_dot_product_attention, low, n, q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        return out[:, :, start:n] if pad or start else out

    pieces = [attend(q, k, v) for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(pieces, 2).transpose(1, 2).contiguous(), None


LOW_PRECISION = (torch.bfloat16, torch.float16)


def runs_in_float32(low: Optional[torch.dtype], keys: int) -> bool:
    """Whether attention over ``keys`` keys in ``low`` (:func:`cpu_low_precision`) runs in float32."""
    return low is not None and keys <= FLOAT32_UP_TO


def in_float32(attend, low: Optional[torch.dtype], keys: int, *args, **kwargs) -> torch.Tensor:
    """``attend(*args, **kwargs)``; where :func:`runs_in_float32`, with its floating-point tensor
    arguments (queries, keys, values, an additive mask or position bias) in float32 and autocast
    off, and the output cast to ``low``."""
    if not runs_in_float32(low, keys):
        return attend(*args, **kwargs)
    up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731  (bool masks stay)
    with torch.autocast("cpu", enabled=False):
        return attend(*map(up, args), **{k: up(v) for k, v in kwargs.items()}).to(low)


def cpu_low_precision(query: torch.Tensor) -> Optional[torch.dtype]:
    """The low precision (bf16, fp16) SDPA would compute ``query`` in on a CPU; None elsewhere."""
    dtype = sdpa_dtype(query)
    return dtype if query.device.type == "cpu" and dtype in LOW_PRECISION else None


def sdpa_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype SDPA computes ``query`` in: autocast's where it is on (under CPU bf16 autocast
    the query arrives in float32, promoted by the float32 rotary tables, and SDPA casts it)."""
    device = query.device.type
    if query.dtype in LOW_PRECISION or not torch.is_autocast_enabled(device):
        return query.dtype
    return torch.get_autocast_dtype(device)


def use_packed_attention(model) -> bool:
    """Switch ``model`` (a transformers model using SDPA) to :func:`packed_sdpa`; False where
    the model uses another attention implementation (then examples are padded instead)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    if config._attn_implementation == NAME:
        return True
    if config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as SDPA for padded batches
    model.set_attn_implementation(NAME)
    return True


def kv_cache(output) -> tuple[str, Optional[object]]:
    """(the output field's name, the KV cache) of a forward run with ``use_cache``; the cache is
    None unless every layer keeps all positions (transformers' DynamicLayer: not sliding windows
    or hybrid layers), the only kind a shared prefix is cut from. transformers 5 renamed the
    field from ``past_key_values`` to ``cache``."""
    from transformers.cache_utils import DynamicLayer

    name = "cache" if "cache" in output else "past_key_values"
    layers = getattr(output[name], "layers", None)
    plain = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
    return name, output[name] if plain else None
