"""model/attention.py: per-example attention over a packed row; bf16/fp16 on CPU pads each
example to a multiple of 16 (a bounded set of kernel shapes) without changing the result."""

import pytest
import torch
import torch.nn.functional as F

from fedtune.model import attention
from tests.tolerance import close

LENGTHS = [5, 16, 23, 1, 40]  # ends inside, at and past a multiple of 16
HEADS, KV_HEADS, DIM = 4, 2, 8


def qkv(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(LENGTHS)
    make = lambda heads: torch.randn(1, heads, t, DIM, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(HEADS), make(KV_HEADS), make(KV_HEADS)


def per_example(q, k, v):
    """The definition: causal SDPA on each example alone, at its own length, in fp32."""
    outs = [F.scaled_dot_product_attention(a.float(), b.float(), c.float(), is_causal=True, enable_gqa=True)
            for a, b, c in zip(q.split(LENGTHS, 2), k.split(LENGTHS, 2), v.split(LENGTHS, 2))]
    return torch.cat(outs, 2).transpose(1, 2)


def packed(q, k, v):
    out, _ = attention.packed_sdpa(None, q, k, v, None, **{attention.SEGMENTS: torch.tensor(LENGTHS)})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_equals_each_example_alone_with_gradients(dtype):
    q, k, v = qkv(dtype)
    out = packed(q, k, v)
    assert out.dtype == dtype and out.shape == (1, sum(LENGTHS), HEADS, DIM)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * cotangent).sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    ref = per_example(q, k, v)
    (ref * cotangent).sum().backward()
    # fp32: rounding only; bf16: the inputs' own rounding (8 mantissa bits) bounds the difference
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    assert close(out.float(), ref, rel)
    assert all(close(a.float(), b.float(), 2 * rel) for a, b in zip(got, (x.grad for x in (q, k, v))))


@pytest.mark.parametrize("dtype, lengths", [
    (torch.bfloat16, [16, 16, 32, 16, 48]),  # every example padded up to a multiple of 16
    (torch.float16, [16, 16, 32, 16, 48]),
    (torch.float32, LENGTHS),  # fp32 kernels cache nothing per shape: no padding, no waste
])
def test_cpu_low_precision_attention_runs_at_multiples_of_16(monkeypatch, dtype, lengths):
    """Before: bf16 SDPA ran at every example's own length, and PyTorch's CPU flash-attention kept
    kernels for each length it met (an unbounded cache: RSS grew every step of a bf16 run)."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, *a, **k):
        seen.append(q.shape[2])
        return sdpa(q, *a, **k)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        packed(*qkv(dtype))
    assert seen == lengths


def test_a_bf16_autocast_forward_pads_its_attention(tiny_model_dir, tokenizer, monkeypatch):
    """Before: under CPU bf16 autocast the query arrives in float32 (the rotary tables promote it)
    and SDPA casts it to bf16 itself, so the padding, keyed on the query's dtype, never ran."""
    from fedtune.data.prompts import pack
    from fedtune.model import forward
    from tests.model.test_forward import ROWS, batch_of, lora_model

    model, _ = lora_model(tiny_model_dir)
    assert attention.use_packed_attention(model)
    batch = pack(batch_of(tokenizer, ROWS))
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, *a, **k):
        seen.append(q.shape[2])
        return sdpa(q, *a, **k)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        forward.sequence_nll(model, **batch)
    assert seen and all(n % 16 == 0 for n in seen)
    seen.clear()
    with torch.no_grad():  # float32: each example at its own length
        forward.sequence_nll(model, **batch)
    assert sorted(set(seen)) == sorted({int(e.input_ids.numel()) for e in batch_of(tokenizer, ROWS)})
