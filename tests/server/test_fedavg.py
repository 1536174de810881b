import torch

from fedtune.server.aggregate import Median
from fedtune.server.fedavg import FedAvg
from fedtune.types import ClientUpdate
from tests.server.helpers import update

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


def test_fedavg_over_three_rounds():
    strat = FedAvg()
    state = strat.init_state(GLOBAL)
    g1, state = strat.aggregate(GLOBAL, [update(0, 1, a=[1.0, 1.0], b=[[0.0]]), update(1, 3, a=[-1.0, 3.0], b=[[4.0]])], state)
    # round 1: a += (1*[1,1] + 3*[-1,3])/4 = [-0.5, 2.5]; b += 3
    assert torch.allclose(g1["a"], torch.tensor([0.5, 4.5])) and torch.allclose(g1["b"], torch.tensor([[3.5]]))
    g2, state = strat.aggregate(g1, [update(2, 5, a=[2.0, -2.0], b=[[1.0]])], state)
    assert torch.allclose(g2["a"], torch.tensor([2.5, 2.5])) and torch.allclose(g2["b"], torch.tensor([[4.5]]))
    g3, state = strat.aggregate(g2, [update(0, 1, a=[0.0, 0.0], b=[[1.0]]), update(2, 1, a=[1.0, 1.0], b=[[0.0]])], state)
    assert torch.allclose(g3["a"], torch.tensor([3.0, 3.0])) and torch.allclose(g3["b"], torch.tensor([[5.0]]))
    assert state == {}


def test_fedavg_equals_weighted_average_of_local_adapters():
    locals_ = [{"a": torch.tensor([2.0, 2.0]), "b": torch.tensor([[1.0]])}, {"a": torch.tensor([5.0, -1.0]), "b": torch.tensor([[0.0]])}]
    ups = [ClientUpdate(i, n, {k: loc[k] - GLOBAL[k] for k in GLOBAL}) for i, (loc, n) in enumerate(zip(locals_, [3, 1]))]
    new, _ = FedAvg().aggregate(GLOBAL, ups, {})
    for k in GLOBAL:
        assert torch.allclose(new[k], (3 * locals_[0][k] + locals_[1][k]) / 4)


def test_fedavg_with_a_robust_aggregator():
    ups = [update(0, 1, a=[1.0, 0.0], b=[[0.0]]), update(1, 1, a=[2.0, 0.0], b=[[0.0]]), update(2, 1000, a=[1e9, 0.0], b=[[0.0]])]
    new, _ = FedAvg(Median()).aggregate(GLOBAL, ups, {})
    assert torch.equal(new["a"], torch.tensor([1.0 + 2.0, 2.0]))  # the median delta [2, 0], whatever client 2 claims
