import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.server.hetlora import aggregate_ranks, product_norm, rank_axis, rank_mask, sparsity_weighted, truncate
from fedtune.types import ClientUpdate
from tests.tolerance import close

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

    full = {"m.lora_A.weight": torch.ones(2, 1), "m.lora_B.weight": torch.ones(1, 2)}  # rank 2, all ones
    low = {"m.lora_A.weight": torch.tensor([[3.0], [0.0]]), "m.lora_B.weight": torch.tensor([[3.0, 0.0]])}  # rank 1
    out = Mean("slice_mean")([ClientUpdate(0, 1, full), ClientUpdate(1, 3, low, rank=1)])
    # slice 0: (1*1 + 3*3) / 4 = 2.5; slice 1: only the full-rank client trained it -> 1
    assert torch.equal(out["m.lora_A.weight"], torch.tensor([[2.5], [1.0]]))
    assert torch.equal(out["m.lora_B.weight"], torch.tensor([[2.5, 1.0]]))


# HetLoRA's sparsity-weighted aggregation (Cho et al. 2024), by hand. One module, in = out = 1,
# R = 2; global A = [[1], [2]], B = [[1, 1]].
#   client 0, rank 1: delta A = [[1], [0]], B = [[1, 0]] -> local A = [[2], [0]], B = [[2, 0]], BA = 4
#   client 1, rank 2: delta A = [[0], [1]], B = [[1, 0]] -> local A = [[1], [3]], B = [[2, 1]], BA = 5
# p = (4/9, 5/9); new A = 4/9 [[2], [0]] + 5/9 [[1], [3]] = [[13/9], [15/9]];
#                 new B = 4/9 [[2, 0]] + 5/9 [[2, 1]] = [[2, 5/9]].
G = {A: torch.tensor([[1.0], [2.0]]), B: torch.tensor([[1.0, 1.0]])}
D0 = {A: torch.tensor([[1.0], [0.0]]), B: torch.tensor([[1.0, 0.0]])}
D1 = {A: torch.tensor([[0.0], [1.0]]), B: torch.tensor([[1.0, 0.0]])}
NEW_A, NEW_B = torch.tensor([[13 / 9], [15 / 9]]), torch.tensor([[2.0, 5 / 9]])


def test_sparsity_weighted_hand_computed():
    out = sparsity_weighted(G, [D0, D1], [1, 2])
    assert torch.allclose(G[A] + out[A], NEW_A, rtol=1e-6, atol=0)
    assert torch.allclose(G[B] + out[B], NEW_B, rtol=1e-6, atol=0)


def test_mean_defaults_to_sparsity_weighted_through_fedavg():
    from fedtune.server.aggregate import Mean
    from fedtune.server.fedavg import FedAvg

    # example counts do not enter the paper's weights: 100 examples for client 0 change nothing
    updates = [ClientUpdate(0, 100, D0, rank=1), ClientUpdate(1, 1, D1)]  # rank None: full rank
    new, _ = FedAvg().aggregate(G, updates, {})
    assert torch.allclose(new[A], NEW_A, rtol=1e-6, atol=0) and torch.allclose(new[B], NEW_B, rtol=1e-6, atol=0)
    with pytest.raises(Exception, match="needs the global adapter"):
        Mean()(updates)
    # slice_mean on the same updates: slice 0 by examples (100*D0 + 1*D1) / 101, slice 1 from client 1 alone
    new, _ = FedAvg(Mean("slice_mean")).aggregate(G, updates, {})
    assert torch.allclose(new[A], torch.tensor([[1 + 100 / 101], [3.0]]), rtol=1e-6, atol=0)
    assert torch.allclose(new[B], torch.tensor([[2.0, 1.0]]), rtol=1e-6, atol=0)


def test_sparsity_weighted_equal_ranks_is_the_norm_weighted_mean():
    g = torch.Generator().manual_seed(0)
    glob = {A: torch.randn(3, 5, generator=g), B: torch.randn(4, 3, generator=g)}
    ds = [{A: torch.randn(3, 5, generator=g), B: torch.randn(4, 3, generator=g)} for _ in range(3)]
    out = sparsity_weighted(glob, ds, [3, 3, 3])
    norms = [torch.linalg.matrix_norm((glob[B] + d[B]) @ (glob[A] + d[A])).item() for d in ds]
    p = [n / sum(norms) for n in norms]
    for k in (A, B):
        assert close(out[k], sum(pk * d[k] for pk, d in zip(p, ds)), 1e-6, max(float(d[k].abs().max()) for d in ds))


def test_product_norm_is_the_frobenius_norm_of_b_times_a():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 7, generator=g), torch.randn(6, 4, generator=g)
    assert product_norm(b, a) == pytest.approx(torch.linalg.matrix_norm((b.double() @ a.double())).item(), rel=1e-12)


def test_sparsity_weighted_all_zero_products_weigh_equally():
    zero = {A: torch.zeros(2, 1), B: torch.zeros(1, 2)}
    d0 = {A: torch.tensor([[2.0], [0.0]]), B: torch.zeros(1, 2)}  # B stays 0: BA = 0 for everyone
    d1 = {A: torch.tensor([[4.0], [6.0]]), B: torch.zeros(1, 2)}
    out = sparsity_weighted(zero, [d0, d1], [1, 2])
    assert torch.equal(out[A], torch.tensor([[3.0], [3.0]])) and torch.equal(out[B], torch.zeros(1, 2))

