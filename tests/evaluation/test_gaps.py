import numpy as np
import pytest

from fedtune.evaluation.gaps import answer_intervals, fraction_text, gap_lines, loss_gaps


def shifted_models(shifts: dict[str, float], n: int = 40) -> dict[str, dict]:
    """Per-example NLL of models that differ from one another by a constant per token."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, size=n)
    nll = rng.uniform(1.0, 3.0, size=n) * tokens
    return {m: {"nll": (nll + c * tokens).tolist(), "tokens": tokens.tolist()} for m, c in shifts.items()}


def test_gaps_of_constant_shifts_are_exact_with_degenerate_intervals():
    # Arrange: losses base+0, local-1 -0.2, local-2 -0.5, local-3 -0.3, federated -0.6, centralized -0.8 (relative)
    shifts = {"base": 0.0, "local-1": -0.2, "local-2": -0.5, "local-3": -0.3, "federated": -0.6, "centralized": -0.8}
    per_example = shifted_models(shifts)

    # Act
    gaps = loss_gaps(per_example, np.random.default_rng(5), resamples=100, level=0.9)

    # Assert: federated - X = shift_fed - shift_X in every resample
    expected = {"federated - local-1": -0.4, "federated - local-2": -0.1, "federated - local-3": -0.3,
                "federated - best local-only (local-2)": -0.1, "federated - median local-only": -0.3,
                "federated - centralized": 0.2, "federated - base": -0.6}
    assert [g["name"] for g in gaps["gaps"]] == list(expected)
    for g in gaps["gaps"]:
        assert g["value"] == pytest.approx(expected[g["name"]], abs=1e-9)
        assert (g["low"], g["high"]) == pytest.approx((expected[g["name"]],) * 2, abs=1e-9)
    # fraction of the way: (median -0.3 - fed -0.6) / (median -0.3 - centralized -0.8) = 0.3 / 0.5
    frac = gaps["fraction"]
    assert (frac["value"], frac["low"], frac["high"]) == pytest.approx((0.6, 0.6, 0.6), rel=1e-9)
    assert gaps["examples"] == 40 and gaps["resamples"] == 100 and gaps["level"] == 0.9


def test_identical_models_give_intervals_at_zero_and_the_text_says_so():
    gaps = loss_gaps(shifted_models({"local-1": 0.0, "federated": 0.0}), np.random.default_rng(0), resamples=50, level=0.95)
    (gap,) = gaps["gaps"]
    assert gap == {"name": "federated - local-1", "value": 0.0, "low": 0.0, "high": 0.0}
    assert gaps["fraction"] is None  # no centralized model
    lines = gap_lines(gaps)
    assert lines[0].startswith("held-out loss gaps on 40 held-out examples (95% paired bootstrap interval over examples, 50 resamples")
    assert "federated - local-1  +0.0000 nats  [+0.0000, +0.0000]  interval includes 0" in lines[1]


def test_noise_gives_an_interval_around_the_gap_and_the_fraction_in_words():
    rng = np.random.default_rng(1)
    per_example = shifted_models({"local-1": 0.0, "federated": -0.25, "centralized": -0.5}, n=200)
    per_example["federated"]["nll"] = (np.array(per_example["federated"]["nll"]) + rng.normal(0, 1.0, 200)).tolist()
    gaps = loss_gaps(per_example, np.random.default_rng(2), resamples=300, level=0.95)
    gap = gaps["gaps"][0]
    assert gap["low"] < gap["value"] < gap["high"] < 0
    text = gap_lines(gaps)
    assert "lower" in text[1] and text[-1].startswith("  federated is ")
    assert fraction_text({"value": 0.5, "low": 0.25, "high": 0.75}) == "50% [25%, 75%]"
    assert fraction_text({"value": float("nan"), "low": float("nan"), "high": float("nan")}).startswith("- (")


def test_no_federated_model_no_gaps():
    assert loss_gaps(shifted_models({"base": 0.0, "local-1": 0.1}), np.random.default_rng(0), resamples=5, level=0.9)["gaps"] == []
    assert gap_lines({"gaps": []}) == []


def test_answer_intervals_per_model():
    refs = ["Paris.", "Rome.", "Oslo.", "Lima."]
    answers = {"a": ["Paris.", "Rome.", "Oslo.", "Lima."], "b": ["Paris.", "no", "no", "no"]}
    out = answer_intervals(answers, refs, np.random.default_rng(0), resamples=200, level=0.95)
    assert out["a"]["exact_match"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert out["a"]["rouge_l"]["value"] == 1.0
    b = out["b"]["exact_match"]
    assert b["value"] == 0.25 and 0.0 <= b["low"] <= 0.25 <= b["high"] <= 1.0 and b["low"] < b["high"]
    assert answer_intervals({}, [], np.random.default_rng(0), resamples=5, level=0.9) == {}


def test_accuracy_gap_by_hand_and_degenerate_cases():
    from fedtune.evaluation.gaps import accuracy_gap

    before, after = [0.0, 0.5, 1.0, 0.0], [1.0, 0.5, 1.0, 1.0]  # two pairs flipped to correct: +0.5
    gap = accuracy_gap(before, after, np.random.default_rng(0), resamples=500, level=0.95)
    assert gap["value"] == pytest.approx(0.5) and gap["examples"] == 4
    assert 0.0 <= gap["low"] <= 0.5 <= gap["high"] <= 1.0  # each resample's gap is (flipped pairs drawn) / 4
    same = accuracy_gap(before, before, np.random.default_rng(0), resamples=50, level=0.95)
    assert (same["value"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        accuracy_gap([1.0], [1.0, 0.0], np.random.default_rng(0), resamples=5, level=0.9)
