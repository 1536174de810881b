import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.evaluation.bootstrap import estimate, percentile_interval, ratio_interval, resample_indices, resampled_ratio


def test_resampled_ratio_by_hand():
    # Arrange: three examples (nll sums 2, 4, 9 over 1, 2, 3 tokens) and three hand-picked resamples
    nll, tokens = [2.0, 4.0, 9.0], [1, 2, 3]
    idx = np.array([[0, 0, 0], [0, 1, 2], [2, 2, 1]])

    # Act
    ratios = resampled_ratio(nll, tokens, idx)

    # Assert: 6/3, 15/6, 22/8
    assert ratios.tolist() == pytest.approx([2.0, 2.5, 2.75], rel=1e-12)
    # the central 50%: 25th and 75th percentiles of [2, 2.5, 2.75], linearly interpolated
    assert percentile_interval(ratios, 0.5) == pytest.approx((2.25, 2.625), rel=1e-12)


def test_a_resample_without_tokens_is_left_out():
    ratios = resampled_ratio([1.0, 3.0], [0, 2], np.array([[0, 0], [1, 1]]))
    assert np.isnan(ratios[0]) and ratios[1] == pytest.approx(1.5)
    assert percentile_interval(ratios, 0.9) == pytest.approx((1.5, 1.5))


def test_indices_are_seeded():
    a = resample_indices(5, 7, np.random.default_rng(3))
    assert a.shape == (7, 5) and a.min() >= 0 and a.max() < 5
    assert (a == resample_indices(5, 7, np.random.default_rng(3))).all()
    assert not (a == resample_indices(5, 7, np.random.default_rng(4))).all()


def test_identical_models_give_zero_and_a_constant_shift_a_degenerate_interval():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 30, size=50)
    nll = rng.uniform(0.5, 3.0, size=50) * tokens
    idx = resample_indices(50, 200, np.random.default_rng(1))
    base = resampled_ratio(nll, tokens, idx)

    same = estimate(0.0, resampled_ratio(nll, tokens, idx) - base, 0.95)
    shifted = resampled_ratio(nll + 0.3 * tokens, tokens, idx) - base  # every token 0.3 nats worse

    assert same == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert percentile_interval(shifted, 0.95) == pytest.approx((0.3, 0.3), rel=1e-9)


def test_independent_noise_of_equal_size_gives_an_interval_around_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 0.5, size=400)
    a, b = x + rng.normal(0, 0.1, 400), x + rng.normal(0, 0.1, 400)  # same model up to noise
    idx = resample_indices(400, 500, np.random.default_rng(2))
    ones = np.ones(400)
    low, high = percentile_interval(resampled_ratio(a, ones, idx) - resampled_ratio(b, ones, idx), 0.95)
    assert low < 0 < high and high - low < 0.05  # paired: the shared x cancels, only the noise remains


def test_ratio_interval_of_a_mean():
    idx = np.array([[0, 1, 2, 3], [0, 0, 0, 0], [3, 3, 3, 3]])
    est = ratio_interval([0.0, 1.0, 1.0, 0.5], [1.0] * 4, idx, 0.5)
    assert est["value"] == pytest.approx(0.625)
    # resampled means 0.625, 0, 0.5 -> sorted 0, 0.5, 0.625; 25th/75th percentiles 0.25, 0.5625
    assert (est["low"], est["high"]) == pytest.approx((0.25, 0.5625))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 50.0), st.integers(1, 40)), min_size=1, max_size=30),
       st.floats(-2.0, 2.0), st.integers(0, 2**32 - 1), st.floats(0.5, 0.99))
def test_a_shift_per_token_moves_every_resample_by_the_shift(rows, shift, seed, level):
    nll, tokens = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    idx = resample_indices(len(rows), 20, np.random.default_rng(seed))
    diff = resampled_ratio(nll + shift * tokens, tokens, idx) - resampled_ratio(nll, tokens, idx)
    low, high = percentile_interval(diff, level)
    assert low <= high
    assert low == pytest.approx(shift, abs=1e-9 * (1 + abs(nll).max())) and high == pytest.approx(shift, abs=1e-9 * (1 + abs(nll).max()))
