"""benchmarks/mfu.py: the step FLOP count, by hand, and the shape read from a PEFT model."""

from __future__ import annotations

import pytest

from benchmarks.mfu import ModelShape, gemm_shapes, shape_of, step_flops
from fedtune.model import forward


def test_step_flops_counted_by_hand():
    # Arrange: one layer, d=4, 2 heads of 2, vocab 10; frozen projections 4x4 and 4x8, LoRA (r=2) on the 4x4 one.
    shape = ModelShape(layers=1, hidden=4, heads=2, head_dim=2, vocab=10,
                       base_linears=((4, 4), (4, 8)), lora_linears=((4, 4),), rank=2)
    # Act: two packed examples of 3 and 2 tokens (T=5), 4 labelled positions.
    flops = step_flops(shape, [3, 2], labelled=4)
    # Assert. N = 16 + 32 = 48; forward 2*48*5 = 480, input gradient the same.
    assert flops["base_forward"] == 480
    assert flops["base_input_grad"] == 480
    # causal pairs 6 + 3 = 9; forward 2 matmuls * 2 * h*d_h (4) * 9 = 144; with backward 3x = 432.
    assert flops["attention"] == 432
    # LoRA forward 2*5*2*(4+4) = 160; with backward 3x = 480.
    assert flops["lora"] == 480
    # head: logits 2*4*4*10 = 320 and their input gradient 320.
    assert flops["head"] == 640
    assert flops["total"] == 480 + 480 + 432 + 480 + 640


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: frozen projections stored as model/frozen.py's class
def test_shape_of_a_tiny_peft_llama(tiny_overrides, precision):
    """Before (bf16): the base projections, stored in bf16 as a subclass of nn.Linear, were not counted."""
    from fedtune.config import load_config
    from fedtune.federation import setup

    # Arrange: the tiny Llama (2 layers, d=64, f=128, 4 heads, 2 KV heads) with all-linear LoRA.
    bundle = setup.build_model(load_config(None, [*tiny_overrides, f"train.precision={precision}"]))
    # Act
    shape = shape_of(bundle.model)
    # Assert: 7 projections per layer, all adapted; the head is not among them.
    per_layer = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert sorted(shape.base_linears) == sorted(per_layer * 2)
    assert sorted(shape.lora_linears) == sorted(per_layer * 2)
    assert (shape.layers, shape.hidden, shape.heads, shape.head_dim, shape.vocab) == (2, 64, 4, 16, bundle.model.config.vocab_size)
    assert shape.rank == bundle.peft_config.r
    # the head's matmuls as model/forward.py's fused head runs them: CHUNK labelled positions each
    assert (forward.CHUNK, 64, shape.vocab, 512 // forward.CHUNK) in gemm_shapes(shape, tokens=512, labelled=512)


@pytest.mark.parametrize("lengths", [[1], [7, 1, 3]])
def test_total_is_the_sum_of_terms(lengths):
    shape = ModelShape(layers=2, hidden=8, heads=2, head_dim=4, vocab=5, base_linears=((8, 8),) * 2, lora_linears=(), rank=0)
    flops = step_flops(shape, lengths, labelled=sum(lengths))
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")
    assert flops["lora"] == 0
