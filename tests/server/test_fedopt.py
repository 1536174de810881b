import math

import pytest
import torch

from fedtune.errors import ConfigError
from fedtune.server.fedadagrad import FedAdagrad
from fedtune.server.fedadam import FedAdam
from fedtune.server.fedyogi import FedYogi
from tests.server.helpers import tensors, update


def run(strategy, deltas):
    """Feed one update per round (delta = the round's pseudo-gradient); (x, m, v) after each round."""
    x, state, out = tensors(w=[0.0] * len(deltas[0])), None, []
    state = strategy.init_state(x)
    for r, d in enumerate(deltas):
        x, state = strategy.aggregate(x, [update(r, 1, w=d)], state)
        out.append((x["w"].tolist(), state["m.w"].tolist(), state["v.w"].tolist()))
    return out


def close(got, want):
    return all(math.isclose(g, w, rel_tol=1e-6) for gs, ws in zip(got, want) for a, b in zip(gs, ws) for g, w in zip(a, b))


def test_fedadam_by_hand():
    # eta = 1, beta1 = beta2 = 0.5, tau = 2 (v starts at tau^2 = 4)
    # r1: D=2:  m = 1,                  v = 0.5*4 + 0.5*4 = 4,     x = 1 / (2 + 2) = 0.25
    # r2: D=-2: m = 0.5 - 1 = -0.5,     v = 2 + 2 = 4,             x = 0.25 - 0.5/4 = 0.125
    # r3: D=14: m = -0.25 + 7 = 6.75,   v = 2 + 98 = 100,          x = 0.125 + 6.75/12 = 0.6875
    got = run(FedAdam(server_lr=1.0, beta1=0.5, beta2=0.5, tau=2.0), [[2.0], [-2.0], [14.0]])
    assert close(got, [([0.25], [1.0], [4.0]), ([0.125], [-0.5], [4.0]), ([0.6875], [6.75], [100.0])])


def test_fedyogi_by_hand_both_signs_of_v_minus_delta_sq():
    # eta = 1, beta1 = beta2 = 0.5, tau = 2 (v0 = 4). Coordinate 1 grows v, coordinate 2 shrinks it.
    # c1 r1: D=2:  D^2=4 = v: sign 0, v = 4;          m = 1;    x = 1/4 = 0.25
    # c1 r2: D=8:  D^2=64 > 4: v = 4 + 0.5*64 = 36;    m = 4.5;  x = 0.25 + 4.5/8 = 0.8125
    # c1 r3: D=0:  v = 36 - 0 = 36;                    m = 2.25; x = 0.8125 + 2.25/8 = 1.09375
    # c2 r1: D=8:  v = 4 + 32 = 36;                    m = 4;    x = 4/8 = 0.5
    # c2 r2: D=4:  D^2=16 < 36: v = 36 - 0.5*16 = 28   (Adam would give 0.5*36 + 0.5*16 = 26)
    #              m = 2 + 2 = 4;                      x = 0.5 + 4/(sqrt(28) + 2)
    # c2 r3: D=0:  v = 28;  m = 2;                     x += 2/(sqrt(28) + 2)
    got = run(FedYogi(server_lr=1.0, beta1=0.5, beta2=0.5, tau=2.0), [[2.0, 8.0], [8.0, 4.0], [0.0, 0.0]])
    x2 = 0.5 + 4 / (math.sqrt(28) + 2)
    assert close(got, [
        ([0.25, 0.5], [1.0, 4.0], [4.0, 36.0]),
        ([0.8125, x2], [4.5, 4.0], [36.0, 28.0]),
        ([1.09375, x2 + 2 / (math.sqrt(28) + 2)], [2.25, 2.0], [36.0, 28.0]),
    ])


def test_fedadagrad_by_hand():
    # eta = 1, beta1 = 0.5, tau = 3 (v0 = 9); v accumulates D^2
    # r1: D=4:  v = 25,        m = 2,     x = 2/(5 + 3) = 0.25
    # r2: D=12: v = 169,       m = 7,     x = 0.25 + 7/(13 + 3) = 0.6875
    # r3: D=84: v = 7225=85^2, m = 45.5,  x = 0.6875 + 45.5/(85 + 3)
    got = run(FedAdagrad(server_lr=1.0, beta1=0.5, tau=3.0), [[4.0], [12.0], [84.0]])
    assert close(got, [([0.25], [2.0], [25.0]), ([0.6875], [7.0], [169.0]), ([0.6875 + 45.5 / 88], [45.5], [7225.0])])


@pytest.mark.parametrize("cls", [FedAdagrad, FedAdam, FedYogi])
def test_shared_fedopt_contract(cls):
    s = cls(server_lr=0.1, tau=0.01)
    g = tensors(w=[1.0, -1.0])
    state = s.init_state(g)
    assert set(state) == {"m.w", "v.w"}
    assert state["m.w"].tolist() == [0.0, 0.0] and torch.allclose(state["v.w"], torch.full((2,), 1e-4))  # v_{-1} = tau^2
    x, state = s.aggregate(g, [update(0, 1, w=[0.0, 0.0])], state)
    assert torch.equal(x["w"], g["w"])  # a zero pseudo-gradient with zero momentum does not move x
    x, _ = s.aggregate(g, [update(0, 1, w=[1.0, -1.0])], state)
    assert x["w"][0] > 1.0 and x["w"][1] < -1.0  # the step follows the sign of the delta


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_bad_hyperparameters_are_all_reported(cls):
    with pytest.raises(ConfigError) as e:
        cls(server_lr=0.0, beta1=1.0, beta2=-0.1, tau=0.0)
    assert e.value.problems == [
        "strategy.server_lr: must be > 0, got 0.0",
        "strategy.beta1: must be in [0, 1), got 1.0",
        "strategy.beta2: must be in [0, 1), got -0.1",
        "strategy.tau: must be > 0, got 0.0",
    ]


def test_fedadagrad_has_no_beta2():
    with pytest.raises(TypeError):
        FedAdagrad(beta2=0.9)
