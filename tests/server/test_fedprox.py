import pytest
import torch

from fedtune.errors import ConfigError
from fedtune.server.fedavg import FedAvg
from fedtune.server.fedprox import FedProx
from fedtune.types import PROX_MU
from tests.server.helpers import tensors, update

GLOBAL = tensors(w=[0.0, 1.0])


def test_fedprox_sends_mu_and_aggregates_like_fedavg_over_two_rounds():
    prox, avg = FedProx(mu=0.25), FedAvg()
    state = prox.init_state(GLOBAL)
    assert state == {} and prox.client_config(1, state) == {PROX_MU: 0.25}
    x, y = GLOBAL, GLOBAL
    for ups in ([update(0, 1, w=[1.0, 0.0]), update(1, 3, w=[-1.0, 4.0])], [update(1, 2, w=[0.5, 0.5])]):
        x, state = prox.aggregate(x, ups, state)
        y, _ = avg.aggregate(y, ups, {})
        assert torch.equal(x["w"], y["w"])
    assert x["w"].tolist() == [0.0, 4.5]  # round 1: (1*[1,0] + 3*[-1,4])/4 = [-0.5, 3]; round 2: + [0.5, 0.5]
    assert prox.client_config(2, state) == {PROX_MU: 0.25}


def test_negative_mu_is_refused():
    with pytest.raises(ConfigError, match="strategy.mu: the proximal weight must be >= 0, got -0.1"):
        FedProx(mu=-0.1)
