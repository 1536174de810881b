"""Attention over packed rows: several examples in one row, each attending only to itself.

Packing a micro-batch into one row removes padding from every matmul, but plain SDPA over a
packed row either mixes the examples (no mask) or, with a block-diagonal mask, computes the
full row x row score matrix (4x the work for four examples). Flash-attention's varlen kernels
solve this on CUDA; on CPU there is none. Here the packed row's queries, keys and values are
split at the example boundaries and SDPA runs causally on each piece: exact per-example
attention, no padding, no wasted scores.

On a CPU, attention under bf16/fp16 (autocast's or the inputs') runs in float32, at each
example's own length, and its output is cast back (:func:`in_float32`). PyTorch's low-precision
CPU flash-attention is slower: its backward took 2-3x as long for examples of up to 160 tokens
(1.75 vs 0.81 ms per layer at 96 tokens, forward + backward with the casts; 11.2 vs 10.4 at 384;
Zen 4 EPYC, 2 cores). It also builds (and keeps, in an unbounded cache) brgemm kernels for every
sequence length it meets: with packed rows of ever-new example lengths a bf16 run's memory grew
~10 MB per step without end (benchmarks/results/shape_memory.json), where the float32 kernel
keeps nothing per length. The results differ from the low-precision kernel's by its rounding
only (it rounds the softmax's probabilities and the output to bf16).

A packed row may also carry ``fedtune_prefix``: the keys and values, per layer, of tokens
that every example of the row starts with (a chat template's system prompt) and that were
cut off before packing (evaluation/heldout.py). Each example's keys and values are put behind
them, with zero queries at the prefix positions whose outputs are dropped, so the same causal
kernel attends exactly as if the prefix were still in front of the example.

The function is registered with transformers' attention interface as ``fedtune_sdpa``; it
is plain SDPA unless the forward call carries ``fedtune_segments`` (the example lengths of
a packed row, see ``data.prompts.pack``), so generation and padded batches run plain SDPA (in
float32 on a CPU, as above).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NAME = "fedtune_sdpa"
SEGMENTS = "fedtune_segments"
PREFIX = "fedtune_prefix"


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None, **kwargs):
    """transformers attention function: (b, heads, t, d) in, (b, t, heads, d) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = sdpa_dtype(query)
    if query.device.type == "cpu" and dtype in LOW_PRECISION:
        return in_float32(packed_sdpa, dtype, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    segments = kwargs.pop(SEGMENTS, None)
    prefix = kwargs.pop(PREFIX, None)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
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
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        return out[:, :, start:] if start else out

    pieces = [attend(q, k, v) for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(pieces, 2).transpose(1, 2).contiguous(), None


LOW_PRECISION = (torch.bfloat16, torch.float16)


def in_float32(attend, dtype: torch.dtype, module, query, key, value, attention_mask, *args, **kwargs):
    """``attend``'s output (and attention weights, if any) for the queries, keys, values and
    additive mask in float32, with autocast off, cast to ``dtype``."""
    up = lambda t: t.float() if t is not None and t.is_floating_point() else t  # noqa: E731  (a bool mask stays bool)
    with torch.autocast(query.device.type, enabled=False):
        out, weights = attend(module, up(query), up(key), up(value), up(attention_mask), *args, **kwargs)
    return out.to(dtype), weights if weights is None else weights.to(dtype)


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
