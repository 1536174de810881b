import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.server.hetlora import aggregate_ranks, rank_axis, rank_mask, truncate

A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"


def test_rank_axis():
    assert rank_axis(A) == 0 and rank_axis(B) == 1
    with pytest.raises(ValueError):
        rank_axis("m.q.weight")


def test_truncate_keeps_the_top_ranks():
    g = {A: torch.arange(6.0).view(3, 2), B: torch.arange(6.0).view(2, 3)}  # R = 3
    t = truncate(g, 2)
    assert torch.equal(t[A], torch.tensor([[0.0, 1.0], [2.0, 3.0], [0.0, 0.0]]))
    assert torch.equal(t[B], torch.tensor([[0.0, 1.0, 0.0], [3.0, 4.0, 0.0]]))
    assert torch.equal(rank_mask(g, 1)[A], torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))


def test_truncated_adapter_computes_the_top_r_part():
    g = {A: torch.randn(4, 5), B: torch.randn(6, 4)}
    t = truncate(g, 2)
    assert torch.allclose(t[B] @ t[A], g[B][:, :2] @ g[A][:2])


def test_slice_wise_average_hand_computed():
    # client 0: rank 1, n=1, delta A = [[2, 2], [0, 0]] ; client 1: rank 2, n=3, delta A = [[6, 6], [4, 4]]
    d0 = {A: torch.tensor([[2.0, 2.0], [0.0, 0.0]]), B: torch.tensor([[1.0, 0.0]])}
    d1 = {A: torch.tensor([[6.0, 6.0], [4.0, 4.0]]), B: torch.tensor([[5.0, 8.0]])}
    out = aggregate_ranks([d0, d1], [1, 2], [0.25, 0.75])
    # slice 0: (0.25*2 + 0.75*6) / 1 = 5 ; slice 1: only client 1 trained it -> 4 (not diluted to 3)
    assert torch.allclose(out[A], torch.tensor([[5.0, 5.0], [4.0, 4.0]]))
    assert torch.allclose(out[B], torch.tensor([[0.25 * 1 + 0.75 * 5, 8.0]]))


def test_equal_ranks_reduce_to_fedavg():
    ds = [{A: torch.randn(3, 4), B: torch.randn(5, 3)} for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    out = aggregate_ranks(ds, [3, 3, 3], w)
    for k in (A, B):
        assert torch.allclose(out[k], sum(wi * d[k] for wi, d in zip(w, ds)), atol=1e-6)


def test_untrained_slice_stays_zero():
    ds = [{A: torch.ones(4, 2), B: torch.ones(2, 4)}]
    out = aggregate_ranks([truncate(ds[0], 2)], [2], [1.0])
    assert torch.count_nonzero(out[A][2:]) == 0 and torch.count_nonzero(out[B][:, 2:]) == 0


@settings(max_examples=40, deadline=None)
@given(ranks=st.lists(st.integers(1, 4), min_size=1, max_size=5), seed=st.integers(0, 99))
def test_identical_truncated_updates_are_fixed_points(ranks, seed):
    g = torch.Generator().manual_seed(seed)
    full = {A: torch.randn(4, 3, generator=g), B: torch.randn(3, 4, generator=g)}
    ds = [truncate(full, r) for r in ranks]
    w = [1 / len(ranks)] * len(ranks)
    out = aggregate_ranks(ds, ranks, w)
    assert torch.allclose(out[A], truncate(full, max(ranks))[A], atol=1e-5)


def test_mean_aggregator_averages_heterogeneous_ranks_slice_by_slice():
    from fedtune.server.aggregate import Mean
    from fedtune.types import ClientUpdate

    full = {"m.lora_A.weight": torch.ones(2, 1), "m.lora_B.weight": torch.ones(1, 2)}  # rank 2, all ones
    low = {"m.lora_A.weight": torch.tensor([[3.0], [0.0]]), "m.lora_B.weight": torch.tensor([[3.0, 0.0]])}  # rank 1
    out = Mean()([ClientUpdate(0, 1, full), ClientUpdate(1, 3, low, rank=1)])
    # slice 0: (1*1 + 3*3) / 4 = 2.5; slice 1: only the full-rank client trained it -> 1
    assert torch.equal(out["m.lora_A.weight"], torch.tensor([[2.5], [1.0]]))
    assert torch.equal(out["m.lora_B.weight"], torch.tensor([[2.5, 1.0]]))
