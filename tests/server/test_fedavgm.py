import pytest
import torch

from fedtune.errors import ConfigError
from fedtune.server.fedavg import FedAvg
from fedtune.server.fedavgm import FedAvgM
from tests.server.helpers import tensors, update

GLOBAL = tensors(w=[0.0, 1.0])
# The same three rounds for both tests: round deltas [1, 2] (mean of two clients), [-1, 0], [0, 0]
ROUNDS = [
    [update(0, 1, w=[2.0, 2.0]), update(1, 1, w=[0.0, 2.0])],
    [update(2, 4, w=[-1.0, 0.0])],
    [update(0, 1, w=[0.0, 0.0])],
]


def run(strategy):
    state, x, seen = strategy.init_state(GLOBAL), GLOBAL, []
    for ups in ROUNDS:
        x, state = strategy.aggregate(x, ups, state)
        seen.append((x["w"].tolist(), state["momentum.w"].tolist()))
    return seen


def test_fedavgm_momentum_over_three_rounds():
    # beta = 0.5, eta = 1:  v1 = [1, 2],                x1 = [1, 3]
    #                       v2 = 0.5 v1 + [-1, 0] = [-0.5, 1],   x2 = [0.5, 4]
    #                       v3 = 0.5 v2 = [-0.25, 0.5],          x3 = [0.25, 4.5]
    assert run(FedAvgM(server_lr=1.0, momentum=0.5)) == [
        ([1.0, 3.0], [1.0, 2.0]),
        ([0.5, 4.0], [-0.5, 1.0]),
        ([0.25, 4.5], [-0.25, 0.5]),
    ]


def test_fedavgm_server_lr_scales_the_momentum_step():
    # eta = 0.5: x1 = [0, 1] + 0.5 [1, 2] = [0.5, 2]; x2 = x1 + 0.5 [-0.5, 1] = [0.25, 2.5]; x3 = x2 + 0.5 [-0.25, 0.5]
    assert [x for x, _ in run(FedAvgM(server_lr=0.5, momentum=0.5))] == [[0.5, 2.0], [0.25, 2.5], [0.125, 2.75]]


def test_no_momentum_and_unit_lr_is_fedavg_bit_for_bit():
    m, a = FedAvgM(server_lr=1.0, momentum=0.0), FedAvg()
    xm, sm, xa = GLOBAL, m.init_state(GLOBAL), GLOBAL
    for ups in ROUNDS:
        xm, sm = m.aggregate(xm, ups, sm)
        xa, _ = a.aggregate(xa, ups, {})
        assert torch.equal(xm["w"], xa["w"])


@pytest.mark.parametrize("kw, message", [({"momentum": 1.0}, "strategy.momentum: must be in [0, 1)"), ({"momentum": -0.1}, "strategy.momentum"), ({"server_lr": 0.0}, "strategy.server_lr: must be > 0")])
def test_bad_hyperparameters(kw, message):
    with pytest.raises(ConfigError) as e:
        FedAvgM(**kw)
    assert message in str(e.value)
