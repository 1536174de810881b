"""model/attention.py: per-example attention over a packed row; bf16/fp16 on CPU runs in
float32 at each example's own length up to FLOAT32_UP_TO keys (faster, no kernel kept per
length) and beyond in the low precision at a multiple of 16 (a bounded set of kernel shapes)."""

import pytest
import torch
import torch.nn.functional as F

from fedtune.model import attention
from tests.tolerance import close

LENGTHS = [5, 16, 23, 1, 40]  # a one-token example among them
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


@pytest.mark.parametrize("dtype, float32_up_to", [(torch.float32, 384), (torch.bfloat16, 384), (torch.bfloat16, 20)])
def test_packed_attention_equals_each_example_alone_with_gradients(monkeypatch, dtype, float32_up_to):
    monkeypatch.setattr(attention, "FLOAT32_UP_TO", float32_up_to)  # 20: the 23- and 40-token examples in bf16, padded
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


def test_under_cpu_autocast_attention_is_float32_attention_rounded_once():
    """The training case: under CPU bf16 autocast the queries and keys arrive in float32 (the
    rotary tables promote them) and the values in bf16. The result is exactly float32 attention
    on those inputs with the output rounded to bf16, and so are the gradients (before: autocast
    rounded q and k to bf16 and PyTorch's bf16 kernel rounded its probabilities)."""
    (q, k, _), (_, _, v) = qkv(torch.float32), qkv(torch.bfloat16, seed=1)
    cotangent = torch.randn(1, sum(LENGTHS), HEADS, DIM, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed(q, k, v)
    (out.float() * cotangent).sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    ref = per_example(q, k, v).to(torch.bfloat16)
    (ref.float() * cotangent).sum().backward()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert [g.dtype for g in got] == [torch.float32, torch.float32, torch.bfloat16]
    assert all(torch.equal(a, x.grad) for a, x in zip(got, (q, k, v)))


def spy_on_sdpa(monkeypatch) -> list:
    """(query length, query dtype, autocast on) of every SDPA call from model/attention.py."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, *a, **k):
        seen.append((q.shape[2], q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, *a, **k)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_attention_runs_in_float32_at_each_examples_length(monkeypatch, dtype):
    """Before: bf16 SDPA ran PyTorch's low-precision CPU flash-attention at every example's length
    padded to a multiple of 16, 1.6-1.7x as slow as float32 for examples up to 160 tokens."""
    seen = spy_on_sdpa(monkeypatch)
    q, k, v = qkv(dtype)
    with torch.no_grad():
        out = packed(q, k, v)
    assert out.dtype == dtype
    assert seen == [(n, torch.float32, False) for n in LENGTHS]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_longer_examples_keep_the_low_precision_kernel_at_multiples_of_16(monkeypatch, dtype):
    """Above FLOAT32_UP_TO keys the low-precision kernel is the faster one; it keeps kernels for
    every length it meets (an unbounded cache: RSS grew every step of a bf16 run), so it only
    ever sees multiples of 16."""
    monkeypatch.setattr(attention, "FLOAT32_UP_TO", 16)
    seen = spy_on_sdpa(monkeypatch)
    with torch.no_grad():
        packed(*qkv(dtype))
    assert seen == [(5, torch.float32, False), (16, torch.float32, False), (32, dtype, False), (1, torch.float32, False), (48, dtype, False)]


def test_padded_attention_under_bf16_autocast_runs_in_float32(monkeypatch):
    """The padded path (no segments: a model without packing, generation) follows the same rule,
    additive mask included."""
    seen = spy_on_sdpa(monkeypatch)
    q, k, v = (x.detach()[:, :, :8] for x in qkv(torch.float32))
    mask = torch.zeros(1, 1, 8, 8).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, HEADS // KV_HEADS
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attention.packed_sdpa(module, q, k, v, mask.bfloat16())
        ref, _ = attention.packed_sdpa(module, q, k, v, mask)
    assert seen == [(8, torch.float32, False)] * 2
    assert out.dtype == torch.bfloat16 and close(out.float(), ref, 1e-2)


def test_a_bf16_autocast_forward_computes_its_attention_in_float32(tiny_model_dir, tokenizer, monkeypatch):
    """Under CPU bf16 autocast the query arrives in float32 (the rotary tables promote it) and
    autocast would cast it to bf16 inside SDPA: the rule keys on autocast's dtype, not the query's."""
    from fedtune.data.prompts import pack
    from fedtune.model import forward
    from tests.model.test_forward import ROWS, batch_of, lora_model

    model, _ = lora_model(tiny_model_dir)
    assert attention.use_packed_attention(model)
    batch = pack(batch_of(tokenizer, ROWS))
    lengths = [int(e.input_ids.numel()) for e in batch_of(tokenizer, ROWS)]
    seen = spy_on_sdpa(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        forward.sequence_nll(model, **batch)
    layers = model.config.num_hidden_layers
    assert seen == [(n, torch.float32, False) for _ in range(layers) for n in lengths]
