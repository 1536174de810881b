"""The weighting of federated evaluation (evaluation/federated.py), against hand-computed numbers."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.evaluation.federated import client_sums, combine, evaluation_clients, means


def test_sft_loss_is_token_weighted_over_clients_and_categories():
    # client 0: math 2 rows / 10 tokens, nll 20; code 1 row / 30 tokens, nll 30. client 1: math 1 row / 40 tokens, nll 120
    scores = {
        1: {"math": {"examples": 1, "tokens": 40, "loss": 120.0}},
        0: {"math": {"examples": 2, "tokens": 10, "loss": 20.0}, "code": {"examples": 1, "tokens": 30, "loss": 30.0}},
    }
    got = combine(scores, "sft")
    assert got["examples"] == 4 and got["tokens"] == 80
    assert got["loss"] == pytest.approx(170 / 80) and got["ppl"] == pytest.approx(math.exp(170 / 80))
    assert got["per_category"]["math"] == pytest.approx({"examples": 3, "tokens": 50, "loss": 140 / 50, "ppl": math.exp(140 / 50)})
    assert got["per_category"]["code"]["loss"] == pytest.approx(1.0)
    assert got["per_client"]["0"]["loss"] == pytest.approx(50 / 40) and got["per_client"]["1"]["loss"] == pytest.approx(3.0)


def test_dpo_metrics_are_weighted_by_pairs():
    a = {"examples": 3, "loss": 3 * 0.5, "reward_accuracy": 2.0, "margin": 3 * 0.1}
    b = {"examples": 1, "loss": 0.9, "reward_accuracy": 0.0, "margin": -0.2}
    got = combine({0: {"x": a}, 1: {"x": b}}, "dpo")
    assert got["examples"] == 4 and "tokens" not in got and "ppl" not in got
    assert got["loss"] == pytest.approx((1.5 + 0.9) / 4)
    assert got["reward_accuracy"] == pytest.approx(0.5) and got["margin"] == pytest.approx((0.3 - 0.2) / 4)


def test_client_sums_from_evaluator_results():
    sft = {"loss": 2.0, "tokens": 40, "per_category": {"a": {"loss": 1.0, "ppl": math.e, "examples": 1},
                                                       "b": {"loss": 2.5, "ppl": 12.2, "examples": 2}}}
    assert client_sums(sft, "sft", {"a": 10, "b": 30}) == {"a": {"examples": 1, "tokens": 10, "loss": 10.0},
                                                          "b": {"examples": 2, "tokens": 30, "loss": 75.0}}
    dpo = {"per_category": {"a": {"loss": 0.5, "reward_accuracy": 0.75, "margin": 0.2, "examples": 4}}}
    assert client_sums(dpo, "dpo") == {"a": {"examples": 4, "loss": 2.0, "reward_accuracy": 3.0, "margin": 0.8}}


def test_no_rows_gives_counts_and_no_loss():
    assert combine({}, "sft") == {"examples": 0, "per_category": {}, "per_client": {}}
    assert means({"examples": 0, "tokens": 0, "loss": 0.0}, "sft")["loss"] is None


category = st.sampled_from(["a", "b", "c"])
sums = st.fixed_dictionaries({"examples": st.integers(1, 50), "tokens": st.integers(1, 500), "loss": st.floats(0, 1e3)})


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.integers(0, 9), st.dictionaries(category, sums, min_size=1), min_size=1))
def test_combining_equals_pooling_all_rows(scores):
    """Whatever the split of rows over clients, the result is that of one client holding them all."""
    pooled: dict = {}
    for per_cat in scores.values():
        for cat, s in per_cat.items():
            into = pooled.setdefault(cat, {"examples": 0, "tokens": 0, "loss": 0.0})
            for k in s:
                into[k] += s[k]
    got, one = combine(scores, "sft"), combine({0: pooled}, "sft")
    assert got["examples"] == one["examples"] and got["tokens"] == one["tokens"]
    assert got["loss"] == pytest.approx(one["loss"], rel=1e-9, abs=1e-12)
    assert all(got["per_category"][c]["loss"] == pytest.approx(one["per_category"][c]["loss"], rel=1e-9, abs=1e-12) for c in pooled)


def test_evaluation_clients_all_or_a_seeded_sample():
    assert evaluation_clients(5, None, 0, 3) == [0, 1, 2, 3, 4] == evaluation_clients(5, 7, 0, 3)
    picked = evaluation_clients(10, 3, 0, 3)
    assert len(picked) == 3 == len(set(picked)) and picked == sorted(picked) and picked == evaluation_clients(10, 3, 0, 3)
    assert any(evaluation_clients(10, 3, 0, r) != picked for r in range(4, 10))
