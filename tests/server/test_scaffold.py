import pytest
import torch

from fedtune.errors import AggregationError, ConfigError
from fedtune.server.fedavg import FedAvg
from fedtune.server.scaffold import Scaffold
from fedtune.types import SERVER_CONTROL
from tests.server.helpers import tensors, update

GLOBAL = tensors(w=[0.0, 0.0])


def test_scaffold_moves_x_and_c_over_three_rounds():
    s = Scaffold(num_clients=4, server_lr=1.0)
    state = s.init_state(GLOBAL)
    assert s.client_config(1, state)[SERVER_CONTROL]["w"].tolist() == [0.0, 0.0]
    # round 1: x1 = (1*[1, 2] + 3*[1, -2]) / 4 = [1, -1];  c1 = 0 + ([4, 0] + [0, 8]) / N=4 = [1, 2]
    x, state = s.aggregate(GLOBAL, [update(0, 1, w=[1.0, 2.0], control={"w": [4.0, 0.0]}), update(1, 3, w=[1.0, -2.0], control={"w": [0.0, 8.0]})], state)
    assert x["w"].tolist() == [1.0, -1.0] and state["control.w"].tolist() == [1.0, 2.0]
    assert s.client_config(2, state)[SERVER_CONTROL]["w"].tolist() == [1.0, 2.0]
    # round 2: x2 = x1 + [2, 2] = [3, 1];  c2 = c1 + [-4, -4] / 4 = [0, 1]
    x, state = s.aggregate(x, [update(2, 1, w=[2.0, 2.0], control={"w": [-4.0, -4.0]})], state)
    assert x["w"].tolist() == [3.0, 1.0] and state["control.w"].tolist() == [0.0, 1.0]
    # round 3: x3 = x2 + ([0, 4] + [2, 0]) / 2 = [4, 3];  c3 = c2 + ([2, 2] + [2, -2]) / 4 = [1, 1]
    x, state = s.aggregate(x, [update(3, 5, w=[0.0, 4.0], control={"w": [2.0, 2.0]}), update(0, 5, w=[2.0, 0.0], control={"w": [2.0, -2.0]})], state)
    assert x["w"].tolist() == [4.0, 3.0] and state["control.w"].tolist() == [1.0, 1.0]


def test_server_lr_scales_the_model_step_not_the_control_step():
    s = Scaffold(num_clients=2, server_lr=0.5)
    x, state = s.aggregate(GLOBAL, [update(0, 1, w=[2.0, -2.0], control={"w": [2.0, 4.0]})], s.init_state(GLOBAL))
    assert x["w"].tolist() == [1.0, -1.0] and state["control.w"].tolist() == [1.0, 2.0]


def test_zero_control_variates_is_fedavg_bit_for_bit():
    ups = [update(0, 3, w=[0.1, 0.7], control={"w": [0.0, 0.0]}), update(1, 7, w=[-0.3, 0.2], control={"w": [0.0, 0.0]})]
    x, state = Scaffold(num_clients=2).aggregate(GLOBAL, ups, Scaffold(num_clients=2).init_state(GLOBAL))
    y, _ = FedAvg().aggregate(GLOBAL, ups, {})
    assert torch.equal(x["w"], y["w"]) and state["control.w"].tolist() == [0.0, 0.0]


def test_control_deltas_are_validated():
    s = Scaffold(num_clients=2)
    with pytest.raises(AggregationError, match="client 1: sent no control variate change"):
        s.aggregate(GLOBAL, [update(1, 1, w=[0.0, 0.0])], s.init_state(GLOBAL))
    with pytest.raises(AggregationError, match=r"client 1: tensor w is \(3,\)"):
        s.aggregate(GLOBAL, [update(1, 1, w=[0.0, 0.0], control={"w": [0.0, 0.0, 0.0]})], s.init_state(GLOBAL))


def test_bad_hyperparameters():
    with pytest.raises(ConfigError, match="strategy.server_lr: must be > 0"):
        Scaffold(num_clients=2, server_lr=-1.0)
    with pytest.raises(ConfigError, match="partition.num_clients"):
        Scaffold(num_clients=0)
