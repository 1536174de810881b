import math

import pytest
import torch

from fedtune.data.sources import Example
from fedtune.federation.attacks import ClientSide, attack_delta, malicious_clients, poison_examples
from fedtune.privacy.dp import l2_norm
from fedtune.privacy.dpfedavg import DPFedAvg
from fedtune.seeding import generator
from fedtune.types import ClientUpdate

HONEST = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]])}


def test_malicious_clients_are_a_seeded_fixed_share():
    assert malicious_clients(10, 0.0, 0) == []
    three = malicious_clients(10, 0.3, 0)
    assert len(three) == 3 and three == sorted(set(three)) and all(0 <= c < 10 for c in three)
    assert malicious_clients(10, 0.3, 0) == three  # same seed, same attackers (resume, other engine)
    assert len(malicious_clients(10, 0.1, 0)) == 1 and len(malicious_clients(4, 1.0, 5)) == 4


def test_sign_flip_negates_and_scale_multiplies_the_honest_delta():
    g = torch.Generator().manual_seed(0)
    flipped = attack_delta(HONEST, "sign_flip", 1.0, g)
    assert torch.equal(flipped["a"], torch.tensor([-1.0, 2.0])) and torch.equal(flipped["b"], torch.tensor([[-0.5]]))
    assert torch.equal(attack_delta(HONEST, "sign_flip", 3.0, g)["a"], torch.tensor([-3.0, 6.0]))
    assert torch.equal(attack_delta(HONEST, "scale", 10.0, g)["a"], torch.tensor([10.0, -20.0]))


def test_gaussian_attack_has_scale_times_the_honest_norm_and_is_seeded():
    a = attack_delta(HONEST, "gaussian", 2.0, torch.Generator().manual_seed(1))
    assert l2_norm(a) == pytest.approx(2.0 * math.sqrt(1 + 4 + 0.25), rel=1e-5)
    b = attack_delta(HONEST, "gaussian", 2.0, torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.allclose(a["a"], HONEST["a"] * a["a"][0] / HONEST["a"][0])


def rows(n):
    return [Example(f"q{i}", "", f"a{i}", "cat") for i in range(n)]


def test_poison_replaces_every_answer():
    out = poison_examples(rows(3), "poison", poison_text="NO", trigger="T", target="X", poison_fraction=0.5, rng=generator(0, "attack", 1))
    assert [e.output for e in out] == ["NO"] * 3 and [e.instruction for e in out] == ["q0", "q1", "q2"]


def test_backdoor_triggers_a_share_of_prompts_with_the_target_answer():
    out = poison_examples(rows(5), "backdoor", poison_text="NO", trigger="T", target="X", poison_fraction=0.5, rng=generator(0, "attack", 1))
    bad = [e for e in out if e.instruction.endswith(" T")]
    assert len(bad) == 3 and all(e.output == "X" for e in bad)  # ceil(0.5 * 5)
    clean = [e for e in out if not e.instruction.endswith(" T")]
    assert all(e.output == "a" + e.instruction[1:] for e in clean)


def test_client_side_attacks_only_the_malicious_and_noises_only_protocol_followers():
    local = DPFedAvg("local", clip_norm=1.0, noise_multiplier=0.0, delta=1e-5, population=4, per_round=2, seed=0)
    side = ClientSide(seed=0, malicious=[1], kind="sign_flip", scale=1.0, local_dp=local)
    honest = side.outgoing(ClientUpdate(0, 5, {k: 10 * v for k, v in HONEST.items()}), round=1)
    assert "malicious" not in honest.metrics and l2_norm(honest.delta) == pytest.approx(1.0, rel=1e-5)  # clipped
    bad = side.outgoing(ClientUpdate(1, 5, dict(HONEST)), round=1)
    assert bad.metrics["malicious"] is True and torch.equal(bad.delta["a"], -HONEST["a"])  # no clipping: it cheats
    data = ClientSide(seed=0, malicious=[1], kind="poison", poison_text="NO")
    assert data.training_examples(0, rows(2)) == rows(2) and [e.output for e in data.training_examples(1, rows(2))] == ["NO", "NO"]
    sent = data.outgoing(ClientUpdate(1, 5, dict(HONEST)), round=1)
    assert sent.metrics["malicious"] is True and torch.equal(sent.delta["a"], HONEST["a"])  # data attackers send honestly
