import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.privacy.dp import clip, epsilon, gaussian_like, l2_norm, noisy_sum


def test_clip_hand_computed():
    d = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}  # ||d|| = 5 over both tensors
    clipped, norm = clip(d, 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6])) and torch.allclose(clipped["b"], torch.tensor([[0.8]]))
    same, _ = clip(d, 10.0)  # under the bound: unchanged
    assert torch.equal(same["a"], d["a"])


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=20), c=st.floats(0.01, 100))
def test_clipped_norm_never_exceeds_bound(values, c):
    clipped, _ = clip({"x": torch.tensor(values)}, c)
    assert l2_norm(clipped) <= c * (1 + 1e-5)


def test_noise_scale_is_z_times_c():
    g = torch.Generator().manual_seed(0)
    zeros = [{"x": torch.zeros(200_000)}] * 3
    out = noisy_sum(zeros, noise_multiplier=1.5, max_norm=0.2, generator=g)
    assert out["x"].std().item() == pytest.approx(0.3, rel=0.01)  # z * C
    assert abs(out["x"].mean().item()) < 0.003


def test_noise_is_reproducible_from_the_generator():
    like = {"b": torch.zeros(3), "a": torch.zeros(2)}
    a = gaussian_like(like, 1.0, torch.Generator().manual_seed(7))
    b = gaussian_like(like, 1.0, torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], b[k]) for k in like)


def test_epsilon_matches_dp_accounting():
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.2)), 10))
    assert epsilon(1.2, 10, 1e-5, population=100, per_round=10, sampling="poisson") == pytest.approx(acc.get_epsilon(1e-5))

    acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(0.6)), 10))
    assert epsilon(1.2, 10, 1e-5, population=100, per_round=10, sampling="fixed") == pytest.approx(acc.get_epsilon(1e-5))


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    e = lambda z, t: epsilon(z, t, 1e-5, population=50, per_round=5, sampling="poisson")  # noqa: E731
    assert e(1.0, 5) < e(1.0, 20)
    assert e(2.0, 10) < e(0.8, 10)
    assert e(1.0, 0) == 0.0
    assert math.isinf(e(0.0, 3))


def test_epsilon_sampling_never_costs_more_than_full_participation():
    """N=100, z=1, 50 rounds: dp_accounting's fixed-size bound gave 244.2 for K=99 and 166.0 for K=100."""
    e99 = epsilon(1.0, 50, 1e-5, population=100, per_round=99, sampling="fixed")
    e100 = epsilon(1.0, 50, 1e-5, population=100, per_round=100, sampling="fixed")
    assert e100 == pytest.approx(166.0, abs=0.1)
    assert e99 <= e100


def _orderwise_epsilon(sampled_event, z_eff, rounds, delta, relation):
    """The reference: RDP of the sampled event and of the plain Gaussian (alpha / (2 z^2) per
    round), minimum order by order, then one conversion to epsilon."""
    import numpy as np
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    acc = RdpAccountant(neighboring_relation=relation)
    acc.compose(dpa.SelfComposedDpEvent(sampled_event, rounds))
    orders = np.asarray(acc._orders, dtype=float)
    gaussian = rounds * orders / (2 * z_eff**2)
    return compute_epsilon(orders, np.minimum(np.asarray(acc._rdp), gaussian), delta)[0]


@pytest.mark.parametrize("k", [10, 90, 99])
def test_epsilon_is_the_orderwise_minimum_of_sampled_and_gaussian_rdp(k):
    import dp_accounting as dpa

    fixed = dpa.SampledWithoutReplacementDpEvent(100, k, dpa.GaussianDpEvent(0.5))
    ref = _orderwise_epsilon(fixed, 0.5, 50, 1e-5, dpa.NeighboringRelation.REPLACE_ONE)
    assert epsilon(1.0, 50, 1e-5, population=100, per_round=k, sampling="fixed") == pytest.approx(ref, rel=1e-12)
    poisson = dpa.PoissonSampledDpEvent(k / 100, dpa.GaussianDpEvent(1.0))
    ref = _orderwise_epsilon(poisson, 1.0, 50, 1e-5, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    assert epsilon(1.0, 50, 1e-5, population=100, per_round=k, sampling="poisson") == pytest.approx(ref, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 200),
    data=st.data(),
    z=st.floats(0.3, 5.0),
    rounds=st.integers(1, 200),
    sampling=st.sampled_from(["fixed", "poisson"]),
)
def test_epsilon_is_monotone_in_clients_per_round(n, data, z, rounds, sampling):
    k = data.draw(st.integers(1, n - 1))
    e = lambda kk: epsilon(z, rounds, 1e-5, population=n, per_round=kk, sampling=sampling)  # noqa: E731
    assert e(k) <= e(k + 1) * (1 + 1e-9)
