import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.lora.layer import Linear

from fedtune.model.base import load_model
from fedtune.model.lora import attach_lora
from fedtune.model.lora_dropout import (
    LoraDelta,
    _dropped,
    keep_mask,
    lora_forward,
    pack_bits,
    unpack_bits,
    use_lean_dropout,
)
from tests.tolerance import FORWARD, close


@given(p=st.sampled_from([0.0, 0.05, 0.1, 0.5, 0.9]), rows=st.integers(1, 40), cols=st.integers(1, 300))
@settings(max_examples=30, deadline=None)
def test_keep_mask_rate_and_shape(p, rows, cols):
    torch.manual_seed(rows * 1000 + cols)
    keep = keep_mask(torch.Size([rows, cols]), p, torch.device("cpu"))
    n = rows * cols
    assert keep.shape == (rows, cols) and keep.dtype == torch.bool
    dropped = int((~keep).sum())
    # within 6 standard deviations of Binomial(n, p) (p is exact to 1/65536)
    assert abs(dropped - n * p) <= 6 * math.sqrt(n * p * (1 - p)) + 1


def test_keep_mask_follows_the_seed_and_draws_independent_halves():
    torch.manual_seed(3)
    a = keep_mask(torch.Size([64, 1000]), 0.5, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask(torch.Size([64, 1000]), 0.5, torch.device("cpu")))
    # the four 16-bit draws of one 64-bit word are independent: each position of the word drops half the time
    by_position = (~a).reshape(-1, 4).float().mean(0)
    assert torch.all((by_position - 0.5).abs() < 0.02)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_and_gradients_equal_the_plain_formula(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.double, requires_grad=True)
    a = torch.randn(4, 7, generator=g, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, 4, generator=g, dtype=torch.double, requires_grad=True)
    result = torch.randn(3, 5, 6, generator=g, dtype=torch.double, requires_grad=True)
    keep = keep_mask(x.shape, p, x.device) if p else None
    scale = 1 / (1 - p)
    ours = LoraDelta.apply(result, x, a, b, keep, scale * 0.5)
    plain = result + ((x * keep * scale if keep is not None else x) @ a.T @ b.T) * 0.5
    assert torch.allclose(ours, plain)
    grads = torch.autograd.grad(ours.square().sum(), (result, x, a, b))
    plain_grads = torch.autograd.grad(plain.square().sum(), (result, x, a, b))
    assert all(torch.allclose(u, v) for u, v in zip(grads, plain_grads))
    assert torch.autograd.gradcheck(lambda r, x, a, b: LoraDelta.apply(r, x, a, b, keep, scale * 0.5), (result, x, a, b))


@pytest.mark.parametrize("dtype,to", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                      (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
def test_dropped_input_is_the_product_and_the_input_is_left_alone(dtype, to):
    """The masked input is made by multiplying the converted mask in place: it must equal
    ``t.to(dtype) * mask`` bit for bit (signed zeros included, and a value that overflows the
    target dtype: inf, or NaN where dropped, as the plain product gives) and never write into ``t``."""
    g = torch.Generator().manual_seed(4)
    t = torch.randn(5, 24, generator=g).to(dtype)
    t[0, :4] = torch.tensor([1e5, -1e5, 1e5, -1e5]).to(dtype)  # beyond float16's range
    before = t.clone()
    keep = keep_mask(t.shape, 0.4, t.device)
    keep[0, :4] = torch.tensor([False, True, True, False])
    for mask in (keep, unpack_bits(pack_bits(keep), t.shape)):
        out = _dropped(t, mask, to)
        expected = t.to(to) * keep.to(to)
        assert out.dtype == to
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(out.signbit(), expected.signbit())
        assert torch.equal(t, before) and out.data_ptr() != t.data_ptr()
    assert _dropped(t, None, dtype) is t


def test_eval_mode_has_no_dropout():
    g = torch.Generator().manual_seed(0)
    r, x, a, b = (torch.randn(*shape, generator=g) for shape in ((2, 5), (2, 8), (3, 8), (5, 3)))
    assert close(lora_forward(r, x, a, b, 0.5, 2.0, training=False), r + x @ a.T @ b.T * 2.0, 1e-6)


def _model(path, dropout):
    base = load_model(str(path), dtype=torch.float32, device=torch.device("cpu"))
    return attach_lora(base, r=4, alpha=8, dropout=dropout, target_modules="all-linear", seed=0, base_name=str(path))


def test_attach_lora_installs_it_only_where_there_is_dropout(tiny_model_dir):
    with_dropout, without = _model(tiny_model_dir, 0.1), _model(tiny_model_dir, 0.0)
    layers = [m for m in with_dropout.modules() if type(m) is Linear]
    assert layers and all("default" in m.lora_variant for m in layers)
    assert not any(m.lora_variant for m in without.modules() if type(m) is Linear)
    assert use_lean_dropout(with_dropout) == 0  # already installed


def test_model_output_equals_peft_in_eval_and_training_uses_the_mask(tiny_model_dir):
    ours = _model(tiny_model_dir, 0.2)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    peft_own = {m: dict(m.lora_variant) for m in ours.modules() if type(m) is Linear}
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])

    def logits(lean: bool, train: bool):
        for m, v in peft_own.items():
            m.lora_variant.clear()
            if lean:
                m.lora_variant.update(v)
        ours.train(train)
        torch.manual_seed(0)
        with torch.no_grad():
            return ours(input_ids=ids).logits

    assert close(logits(True, False), logits(False, False), FORWARD)  # same LoRA function
    assert not torch.allclose(logits(True, True), logits(True, False))  # dropout is active in training
    torch.manual_seed(0)
    assert torch.equal(logits(True, True), logits(True, True))  # seeded masks


def test_under_bf16_autocast_the_output_keeps_the_base_dtype_and_gradients_flow():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, generator=g).bfloat16().requires_grad_()
    result = torch.randn(2, 4, 5, generator=g).bfloat16().requires_grad_()
    a = torch.randn(3, 8, generator=g, requires_grad=True)
    b = torch.randn(5, 3, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_forward(result, x, a, b, 0.1, 2.0, training=True)
    assert out.dtype == torch.bfloat16 and out.shape == result.shape
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and result.grad.dtype == torch.bfloat16
    assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_under_bf16_autocast_a_bf16_input_is_kept_once_not_copied_to_fp32(tiny_model_dir):
    # Arrange: the tiny model's first down_proj (LoRA with lean dropout) and a bf16 input, as under autocast
    model = _model(tiny_model_dir, 0.1)
    layer = next(m for n, m in model.named_modules() if n.endswith("down_proj") and type(m) is Linear)
    x = torch.randn(1, 6, layer.in_features, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
    saved = []

    def run(peft_cast: bool):
        if peft_cast:
            layer.cast_input_dtype_enabled = True
        saved.clear()
        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer.train()(x)
        kept = list(saved)
        grads = torch.autograd.grad(out.float().square().sum(), (x, layer.lora_A["default"].weight))
        return kept, grads

    # Act: as installed (no PEFT input cast), and with PEFT's cast to the adapter's fp32 back on
    kept, grads = run(False)
    _, peft_grads = run(True)
    # Assert: no fp32 copy of the (1, 6, in) input is kept for backward; same gradients as with PEFT's cast
    assert (torch.float32, tuple(x.shape)) not in kept
    assert all(torch.equal(a, b) for a, b in zip(grads, peft_grads))


@given(mask=st.lists(st.booleans(), min_size=0, max_size=70), cols=st.integers(1, 5), start=st.integers(0, 9))
@settings(max_examples=80, deadline=None)
def test_packed_masks_come_back_as_they_went_in(mask, cols, start):
    flat = torch.tensor([False] * start + mask, dtype=torch.bool)[start:]  # a view at any storage offset
    for keep in (flat, flat[: len(mask) // cols * cols].reshape(-1, cols), flat[: len(mask) // cols * cols].reshape(-1, cols).t()):
        packed = pack_bits(keep)  # N-D, transposed (not contiguous), misaligned, empty
        order = keep.reshape(-1).tolist()  # row-major
        assert packed.dtype == torch.uint8 and packed.numel() == (len(order) + 7) // 8
        assert torch.equal(unpack_bits(packed, keep.shape), keep.to(torch.uint8))
        # element i in bit i % 8 of byte i // 8, by hand
        assert packed.tolist() == [sum(1 << j for j, kept in enumerate(order[i : i + 8]) if kept) for i in range(0, len(order), 8)]


def test_strided_masks_are_packed_in_element_order():
    """A column of a 2-D mask or every other element of a 1-D one: reshape(-1) of such a view is
    itself strided, and was read as bytes of the whole storage."""
    g = torch.Generator().manual_seed(6)
    for keep in ((torch.rand(16, 2, generator=g) > 0.5)[:, :1], (torch.rand(32, generator=g) > 0.5)[::2]):
        assert keep.reshape(-1).stride() == (2,)  # 16 elements: whole 64-bit words, so no padded copy is made
        assert torch.equal(unpack_bits(pack_bits(keep), keep.shape), keep.to(torch.uint8))


def test_only_boolean_masks_are_packed():
    with pytest.raises(TypeError):
        pack_bits(torch.tensor([0, 2, 1], dtype=torch.uint8))  # a 2 would spill into the next bit


def test_packed_mask_bytes_by_hand():
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1, 1], [0] * 8 + [1]], dtype=torch.bool)  # 18 elements, row by row
    assert pack_bits(keep).tolist() == [0b10001101, 0b00000001, 0b00000010]
    back = unpack_bits(pack_bits(keep), keep.shape)
    assert back.shape == (2, 9) and torch.equal(back, keep.to(torch.uint8))


@pytest.mark.parametrize("autocast", [False, True])
def test_backward_keeps_the_mask_packed_and_draws_nothing(autocast):
    """Before: under CPU autocast backward drew the mask again from the generator state it came
    from (~250 us per 358 x 576 mask, 5-6% of a bf16 step), in float32 it kept one byte per
    element (115 MB of a 768-token SmolLM2 step). Now both keep one bit per element."""
    # Arrange: one LoRA input and weights, 3 x 9 x 16 = 432 input elements
    g = torch.Generator().manual_seed(2)
    dtype = torch.bfloat16 if autocast else torch.float32
    x = torch.randn(3, 9, 16, generator=g).to(dtype).requires_grad_()
    result = torch.randn(3, 9, 6, generator=g).to(dtype).requires_grad_()
    a = torch.randn(4, 16, generator=g, requires_grad=True)
    b = torch.randn(6, 4, generator=g, requires_grad=True)
    saved = []
    torch.manual_seed(5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = lora_forward(result, x, a, b, 0.3, 0.5, training=True)
    after_forward = torch.get_rng_state()
    # Act
    grads = torch.autograd.grad(out.float().square().sum(), (result, x, a, b))
    # Assert: the mask is kept as 432 / 8 bytes, no boolean or one-byte-per-element mask; backward
    # draws nothing; and the gradients are those of the same mask applied by the plain formula
    assert (torch.uint8, 54) in saved and torch.bool not in [d for d, _ in saved] and (torch.uint8, 432) not in saved
    assert torch.equal(torch.get_rng_state(), after_forward)
    torch.manual_seed(5)
    keep = keep_mask(x.shape, 0.3, x.device)
    plain = result.float() + ((x.float() * keep / 0.7) @ a.T @ b.T) * 0.5
    plain_grads = torch.autograd.grad(plain.square().sum(), (result, x, a, b))
    rel = 2e-2 if autocast else 1e-5  # bf16 roundings in ours (input, rank-r matmuls, output), none in the formula
    assert close(out.float(), plain, rel)
    assert all(close(u.float(), v.float(), rel) for u, v in zip(grads, plain_grads))


def test_under_bf16_autocast_no_full_width_tensor_is_converted_to_fp32():
    """Before: the rank-r matmuls ran in float32, so the (n, in) input and the (n, out) output
    gradient of every adapted layer were converted to float32, forward and backward (15% of a
    bf16 SmolLM2 step). Now they run in bf16; the adapter still gets float32 gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Conversions(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.to_fp32 = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and out.dtype == torch.float32:
                self.to_fp32.append(tuple(out.shape))
            return out

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 40, 24, generator=g).bfloat16().requires_grad_()
    result = torch.randn(1, 40, 32, generator=g).bfloat16().requires_grad_()
    a = torch.randn(4, 24, generator=g, requires_grad=True)
    b = torch.randn(32, 4, generator=g, requires_grad=True)
    conversions = Conversions()
    with conversions:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lora_forward(result, x, a, b, 0.1, 2.0, training=True)
        out.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32 and bool(a.grad.abs().sum() > 0)
    full_width = [s for s in conversions.to_fp32 if s[-2:] in ((40, 24), (40, 32))]
    assert full_width == [(1, 40, 32)]  # only the test's own out.float()


def test_masks_under_activation_checkpointing():
    # Arrange
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 12, generator=g).bfloat16().requires_grad_()
    result = torch.randn(2, 7, 5, generator=g).bfloat16()
    a, b = torch.randn(3, 12, generator=g, requires_grad=True), torch.randn(5, 3, generator=g, requires_grad=True)

    def grads(checkpointed: bool):
        torch.manual_seed(9)

        def f(x, a, b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return lora_forward(result, x, a, b, 0.4, 1.5, training=True)

        out = torch.utils.checkpoint.checkpoint(f, x, a, b, use_reentrant=False) if checkpointed else f(x, a, b)
        return torch.autograd.grad(out.float().square().sum(), (x, a, b))

    # Act / Assert: checkpointing recomputes the forward with the RNG state restored, so the mask
    # packed again is the forward's: the same gradients
    assert all(torch.equal(u, v) for u, v in zip(grads(True), grads(False)))
