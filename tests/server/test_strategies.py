import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.errors import AggregationError
from fedtune.server.strategies import FedAvg, build_strategy, example_weights
from fedtune.types import ClientUpdate


def update(cid, n, **tensors):
    return ClientUpdate(cid, n, {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()})


GLOBAL = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}


def test_fedavg_weights_by_examples_hand_computed():
    # Arrange: deltas weighted 1:2 by num_examples
    u0 = update(0, 10, a=[3.0, 0.0], b=[[1.0]])
    u1 = update(1, 20, a=[0.0, 3.0], b=[[-2.0]])
    # Act
    new, state = FedAvg().aggregate(GLOBAL, [u0, u1], {})
    # Assert: x + (1*d0 + 2*d1)/3
    assert torch.allclose(new["a"], torch.tensor([1.0 + 1.0, 2.0 + 2.0]))
    assert torch.allclose(new["b"], torch.tensor([[0.5 + (1.0 - 4.0) / 3]]))
    assert state == {}


def test_fedavg_over_two_rounds():
    strat = FedAvg()
    state = strat.init_state(GLOBAL)
    g1, state = strat.aggregate(GLOBAL, [update(0, 1, a=[1.0, 1.0], b=[[0.0]]), update(1, 3, a=[-1.0, 3.0], b=[[4.0]])], state)
    # round 1: a += (1*[1,1] + 3*[-1,3])/4 = [-0.5, 2.5]; b += 3
    assert torch.allclose(g1["a"], torch.tensor([0.5, 4.5])) and torch.allclose(g1["b"], torch.tensor([[3.5]]))
    g2, _ = strat.aggregate(g1, [update(2, 5, a=[2.0, -2.0], b=[[1.0]])], state)
    assert torch.allclose(g2["a"], torch.tensor([2.5, 2.5])) and torch.allclose(g2["b"], torch.tensor([[4.5]]))


def test_fedavg_equals_weighted_average_of_local_adapters():
    locals_ = [{"a": torch.tensor([2.0, 2.0]), "b": torch.tensor([[1.0]])}, {"a": torch.tensor([5.0, -1.0]), "b": torch.tensor([[0.0]])}]
    ups = [ClientUpdate(i, n, {k: loc[k] - GLOBAL[k] for k in GLOBAL}) for i, (loc, n) in enumerate(zip(locals_, [3, 1]))]
    new, _ = FedAvg().aggregate(GLOBAL, ups, {})
    for k in GLOBAL:
        assert torch.allclose(new[k], (3 * locals_[0][k] + locals_[1][k]) / 4)


@pytest.mark.parametrize(
    "bad, message",
    [
        (update(7, 1, a=[1.0, 1.0]), "client 7: adapter keys differ"),
        (update(7, 1, a=[1.0, 1.0, 1.0], b=[[0.0]]), "client 7: tensor a is (3,)"),
        (update(7, 1, a=[float("nan"), 1.0], b=[[0.0]]), "client 7: tensor a has NaN or Inf"),
        (update(7, 1, a=[float("inf"), 1.0], b=[[0.0]]), "client 7: tensor a has NaN or Inf"),
        (ClientUpdate(7, 1, {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1, 1)}), "float64"),
        (update(7, -1, a=[0.0, 0.0], b=[[0.0]]), "client 7: num_examples"),
    ],
)
def test_bad_updates_are_rejected_by_name(bad, message):
    with pytest.raises(AggregationError) as e:
        FedAvg().aggregate(GLOBAL, [update(0, 1, a=[0.0, 0.0], b=[[0.0]]), bad], {})
    assert message in str(e.value)


def test_no_updates_or_zero_weight():
    with pytest.raises(AggregationError, match="no client updates"):
        FedAvg().aggregate(GLOBAL, [], {})
    with pytest.raises(AggregationError, match="zero examples"):
        FedAvg().aggregate(GLOBAL, [update(0, 0, a=[0.0, 0.0], b=[[0.0]])], {})


def test_registry():
    assert isinstance(build_strategy("fedavg"), FedAvg)


finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(vals=st.lists(finite, min_size=3, max_size=3), n=st.lists(st.integers(1, 50), min_size=1, max_size=6))
def test_identical_updates_give_that_update(vals, n):
    ups = [ClientUpdate(i, k, {"a": torch.tensor(vals)}) for i, k in enumerate(n)]
    g = {"a": torch.zeros(3)}
    new, _ = FedAvg().aggregate(g, ups, {})
    assert torch.allclose(new["a"], torch.tensor(vals), atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(n=st.lists(st.integers(0, 1000), min_size=1, max_size=20).filter(lambda xs: sum(xs) > 0))
def test_weights_sum_to_one(n):
    ups = [ClientUpdate(i, k, {}) for i, k in enumerate(n)]
    assert sum(example_weights(ups)) == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.tuples(st.lists(finite, min_size=2, max_size=2), st.integers(1, 9)), min_size=2, max_size=6),
    perm_seed=st.integers(0, 1000),
)
def test_client_order_does_not_matter(rows, perm_seed):
    import random

    ups = [ClientUpdate(i, n, {"a": torch.tensor(v)}) for i, (v, n) in enumerate(rows)]
    shuffled = ups[:]
    random.Random(perm_seed).shuffle(shuffled)
    g = {"a": torch.tensor([0.5, -0.5])}
    a, _ = FedAvg().aggregate(g, ups, {})
    b, _ = FedAvg().aggregate(g, shuffled, {})
    assert torch.allclose(a["a"], b["a"], atol=1e-4)
