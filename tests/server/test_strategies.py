"""The contract every strategy keeps, tested over all of them; and the registry."""

import inspect
import random

import pytest
import torch
from peft import LoraConfig

from fedtune.config import STRATEGIES, STRATEGY_PARAMS
from fedtune.errors import ConfigError
from fedtune.federation.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from fedtune.server.aggregate import Krum, Median, TrimmedMean
from fedtune.server.fedavg import FedAvg
from fedtune.server.scaffold import Scaffold
from fedtune.server.strategies import REGISTRY, build_strategy
from fedtune.types import ClientUpdate

KEYS = ("base_model.model.l.lora_A.weight", "base_model.model.l.lora_B.weight")
GLOBAL = {KEYS[0]: torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, -0.5]]), KEYS[1]: torch.zeros(3, 2)}
PEFT = LoraConfig(r=2, lora_alpha=4, target_modules=["l"])

# every strategy, with non-default hyper-parameters where it has them
ALL = {
    "fedavg": {},
    "fedavgm": {"server_lr": 0.7, "momentum": 0.6},
    "fedprox": {"mu": 0.3},
    "scaffold": {"server_lr": 0.8},
    "fedadagrad": {"server_lr": 0.05, "beta1": 0.8, "tau": 0.01},
    "fedadam": {"server_lr": 0.05, "beta1": 0.8, "beta2": 0.9, "tau": 0.01},
    "fedyogi": {"server_lr": 0.05, "beta1": 0.8, "beta2": 0.9, "tau": 0.01},
}


def rounds(seed=0, n_rounds=3, clients=5):
    """Seeded random updates, with control deltas (ignored by all but SCAFFOLD)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda: {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in GLOBAL.items()}  # noqa: E731
    return [[ClientUpdate(c, 1 + c, rand(), control_delta=rand()) for c in range(clients)] for _ in range(n_rounds)]


def play(strategy, ups_by_round, x=None, state=None):
    x = GLOBAL if x is None else x
    state = strategy.init_state(x) if state is None else state
    for ups in ups_by_round:
        x, state = strategy.aggregate(x, ups, state)
    return x, state


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_survives_checkpoint_and_resume_exactly(name, tmp_path):
    ups = rounds()
    straight, straight_state = play(build_strategy(name, num_clients=8, **ALL[name]), ups)

    x1, state1 = play(build_strategy(name, num_clients=8, **ALL[name]), ups[:1])
    save_checkpoint(tmp_path, Checkpoint(1, x1, state1, metrics_lines=0, config_hash="h"), PEFT, seed=0)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt.strategy_state.keys() == state1.keys()
    assert all(torch.equal(ckpt.strategy_state[k], state1[k]) for k in state1)
    fresh = build_strategy(name, num_clients=8, **ALL[name])  # a new process: only the checkpoint survives
    resumed, resumed_state = play(fresh, ups[1:], ckpt.adapter, ckpt.strategy_state)

    assert all(torch.equal(straight[k], resumed[k]) for k in GLOBAL)
    assert all(torch.equal(straight_state[k], resumed_state[k]) for k in straight_state)


@pytest.mark.parametrize("name", STRATEGIES)
def test_aggregate_is_pure(name):
    s = build_strategy(name, num_clients=8, **ALL[name])
    x0 = {k: v.clone() for k, v in GLOBAL.items()}
    state = s.init_state(x0)
    before = {k: v.clone() for k, v in state.items()}
    config = s.client_config(1, state)
    x1, state1 = s.aggregate(x0, rounds()[0], state)
    assert all(torch.equal(x0[k], GLOBAL[k]) for k in GLOBAL)  # inputs untouched
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert any(not torch.equal(x1[k], x0[k]) for k in GLOBAL)
    assert x1.keys() == GLOBAL.keys() and all(x1[k].dtype == torch.float32 and x1[k].shape == GLOBAL[k].shape for k in GLOBAL)
    assert state1.keys() == state.keys()
    assert repr(s.client_config(1, state)) == repr(config)  # a function of the state only


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("aggregator", [None, Median(), TrimmedMean(0.2), Krum(1), Krum(1, m=None)], ids=["mean", "median", "trimmed", "krum", "multikrum"])
def test_client_order_does_not_change_any_strategy(name, aggregator):
    ups = rounds(seed=3)
    shuffled = [random.Random(i).sample(r, len(r)) for i, r in enumerate(ups)]
    a, sa = play(build_strategy(name, aggregator=aggregator, num_clients=8, **ALL[name]), ups)
    b, sb = play(build_strategy(name, aggregator=aggregator, num_clients=8, **ALL[name]), shuffled)
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_registry_builds_every_strategy_with_its_parameters():
    for name in STRATEGIES:
        s = build_strategy(name, num_clients=8, **ALL[name])
        assert s.name == name
        for key, value in ALL[name].items():
            assert getattr(s, key) == value
    assert isinstance(build_strategy("fedavg"), FedAvg)
    assert build_strategy("scaffold", num_clients=12).num_clients == 12 and isinstance(build_strategy("scaffold", num_clients=1), Scaffold)


def test_registry_errors_name_the_key():
    with pytest.raises(ConfigError, match="strategy.name: 'fedsgd' is not one of"):
        build_strategy("fedsgd")
    with pytest.raises(ConfigError, match="strategy.mu: strategy.name=fedadam does not use it"):
        build_strategy("fedadam", mu=0.1)


def test_config_lists_exactly_the_parameters_each_strategy_takes():
    assert tuple(REGISTRY) == STRATEGIES
    for name, cls in REGISTRY.items():
        params = set(inspect.signature(cls).parameters) - {"aggregator", "num_clients"}
        assert params == set(STRATEGY_PARAMS[name]), name
