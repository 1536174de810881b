import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.federation.compression import compress, compress_with_feedback, decompress, payload_bytes


def adapter(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(8, 576, generator=g) * 0.01, "a.lora_B.weight": torch.randn(576, 8, generator=g) * 0.01}


def test_int8_hand_computed_block():
    x = {"t": torch.tensor([1.0, -0.5, 0.25, 0.0])}
    p = compress(x, "int8", block=4)
    # scale = 1/127; codes = round(x * 127) = [127, -64 (-63.5 rounds to even: -64), 32 (31.75), 0]
    assert p["t::q"].tolist() == [127, -64, 32, 0]
    assert p["t::s"].dtype == torch.float16
    back = decompress(p, x, "int8", block=4)["t"]
    assert torch.allclose(back, torch.tensor([127, -64, 32, 0]) * p["t::s"].float(), atol=0)


def test_int4_pack_round_trip_hand_computed():
    x = {"t": torch.tensor([0.7, -0.7, 0.1, 0.0, 0.35])}
    p = compress(x, "int4", block=8)
    # scale = 0.7/7 = 0.1 (as fp16); codes = [7, -7, 1, 0, 4 (3.5 -> 4)] + padding zeros
    back = decompress(p, x, "int4", block=8)["t"]
    s = float(p["t::s"][0])
    assert torch.allclose(back, torch.tensor([7, -7, 1, 0, 4]) * s)
    assert p["t::q"].numel() == 4  # 8 padded codes, two per byte


@pytest.mark.parametrize("method, levels", [("int8", 127), ("int4", 7)])
def test_quantisation_error_bound(method, levels):
    d = adapter()
    back = decompress(compress(d, method), d, method)
    for k, x in d.items():
        blocks = x.reshape(-1, 64)
        bound = blocks.abs().amax(1, keepdim=True) / levels / 2 * 1.01 + 1e-8  # half a step (+fp16 scale rounding)
        assert ((back[k].reshape(-1, 64) - blocks).abs() <= bound).all()


def test_byte_savings():
    d = adapter()
    full = payload_bytes(compress(d, "none"))
    assert full == sum(v.numel() * 4 for v in d.values())
    assert full / payload_bytes(compress(d, "int8")) > 3.7
    assert full / payload_bytes(compress(d, "int4")) > 7.0
    assert full / payload_bytes(compress(d, "topk", fraction=0.1)) > 6.0


def test_topk_keeps_largest():
    x = {"t": torch.tensor([[0.1, -5.0], [3.0, 0.2]])}
    back = decompress(compress(x, "topk", fraction=0.5), x, "topk")["t"]
    assert torch.equal(back, torch.tensor([[0.0, -5.0], [3.0, 0.0]]))


def test_error_feedback_accumulates_what_was_dropped():
    x = {"t": torch.tensor([1.0, 0.4, 0.3])}
    p1, r1 = compress_with_feedback(x, None, "topk", fraction=0.3)  # sends only 1.0
    assert torch.allclose(r1["t"], torch.tensor([0.0, 0.4, 0.3]), atol=1e-3)
    p2, r2 = compress_with_feedback(x, r1, "topk", fraction=0.3)  # target [1.0, 0.8, 0.6]: sends 1.0 again
    assert torch.allclose(r2["t"], torch.tensor([0.0, 0.8, 0.6]), atol=1e-3)
    p3, r3 = compress_with_feedback(x, r2, "topk", fraction=0.3)  # target [1.0, 1.2, 0.9]: sends 1.2
    sent = decompress(p3, x, "topk")["t"]
    assert torch.allclose(sent, torch.tensor([0.0, 1.2, 0.0]), atol=1e-3)
    # over rounds, sent + residual always equals everything the client wanted to send
    assert torch.allclose(sent + r3["t"], x["t"] + r2["t"], atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=300),
    method=st.sampled_from(["none", "int8", "int4", "topk"]),
    block=st.sampled_from([8, 64]),
)
def test_decode_shape_and_bound(values, method, block):
    x = {"t": torch.tensor(values)}
    back = decompress(compress(x, method, block=block, fraction=0.5), x, method, block=block)["t"]
    assert back.shape == x["t"].shape and back.dtype == torch.float32
    assert (back.abs() <= x["t"].abs().max() * 1.001 + 1e-6).all()  # never larger than the largest entry
