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
