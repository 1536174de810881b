import pytest
import torch

from fedtune.privacy import dp
from fedtune.privacy.dpfedavg import RELEASE_ID, DPFedAvg, epsilon_fields
from fedtune.types import ClientUpdate


def make(mode="central", z=0.0, c=1.0, target=None, n=10, k=5):
    return DPFedAvg(mode, clip_norm=c, noise_multiplier=z, delta=1e-5, population=n, per_round=k, seed=3, target_epsilon=target)


def test_central_release_clips_each_delta_and_divides_by_the_sampled_count():
    ups = [ClientUpdate(0, 100, {"x": torch.tensor([3.0, 4.0])}),  # norm 5 -> clipped to (0.6, 0.8)
           ClientUpdate(1, 1, {"x": torch.tensor([0.3, 0.4])})]  # norm 0.5 -> unchanged
    out = make(z=0.0, c=1.0).release(ups, sampled=4, round=1)  # 4 sampled, 2 answered: fixed denominator 4
    assert out.client_id == RELEASE_ID and out.metrics["dp_clients"] == 2
    assert torch.allclose(out.delta["x"], torch.tensor([(0.6 + 0.3) / 4, (0.8 + 0.4) / 4]))  # equal weights, not 100:1


def test_central_noise_has_std_z_c_over_k_and_is_seeded_by_round():
    ups = [ClientUpdate(i, 1, {"x": torch.zeros(200_000)}) for i in range(2)]
    mech = make(z=2.0, c=0.5)
    a = mech.release(ups, sampled=2, round=1).delta["x"]
    assert a.std().item() == pytest.approx(2.0 * 0.5 / 2, rel=0.01)  # z C / K = 0.5
    assert torch.equal(a, mech.release(ups, sampled=2, round=1).delta["x"])  # resume adds the same noise
    assert not torch.equal(a, mech.release(ups, sampled=2, round=2).delta["x"])


def test_local_privatize_clips_then_adds_z_c_noise_per_client():
    big = ClientUpdate(7, 3, {"x": torch.full((100_000,), 1.0)})  # norm sqrt(1e5) ~ 316 -> clipped to 1
    mech = make("local", z=0.0, c=1.0)
    out = mech.privatize(big, round=1)
    assert dp.l2_norm(out.delta) == pytest.approx(1.0, rel=1e-5) and out.metrics["clipped_from"] == pytest.approx(316.227766, rel=1e-6)
    noisy = make("local", z=3.0, c=0.1).privatize(ClientUpdate(7, 3, {"x": torch.zeros(100_000)}), round=1)
    assert noisy.delta["x"].std().item() == pytest.approx(0.3, rel=0.02)
    other = make("local", z=3.0, c=0.1).privatize(ClientUpdate(8, 3, {"x": torch.zeros(100_000)}), round=1)
    assert not torch.equal(noisy.delta["x"], other.delta["x"])  # each client its own draw


def test_central_epsilon_is_the_accountants_for_k_of_n_sampling():
    assert make(z=1.1, n=10, k=5).epsilon(4) == pytest.approx(dp.epsilon(1.1, 4, 1e-5, population=10, per_round=5, sampling="fixed"))


def test_local_epsilon_is_the_gaussian_mechanism_with_sensitivity_2c_composed_every_round():
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(1.1 / 2), 4))  # no amplification: the server sees who sent what
    assert make("local", z=1.1).epsilon(4) == pytest.approx(acc.get_epsilon(1e-5))


def test_last_round_is_the_last_one_within_the_target():
    mech = make(z=1.0)
    e2, e3 = mech.epsilon(2), mech.epsilon(3)
    assert make(z=1.0, target=(e2 + e3) / 2).last_round(10) == 2
    assert make(z=1.0, target=e3).last_round(10) == 3  # reaching the target exactly is allowed
    assert make(z=1.0, target=mech.epsilon(1) / 2).last_round(10) == 0
    assert make(z=1.0).last_round(10) == 10  # no target


def test_epsilon_fields():
    assert epsilon_fields(None, 3) == {}
    assert epsilon_fields(make(z=1.0), 0) == {"epsilon": 0.0, "delta": 1e-5}
