import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.errors import AggregationError, ConfigError
from fedtune.server.aggregate import Krum, Mean, Median, TrimmedMean, build_aggregator, check_updates, example_weights
from fedtune.server.fedavg import FedAvg
from fedtune.types import ClientUpdate
from tests.server.helpers import update

GLOBAL = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad, message",
    [
        (update(7, 1, a=[1.0, 1.0]), "client 7: adapter keys differ"),
        (update(7, 1, a=[1.0, 1.0, 1.0], b=[[0.0]]), "client 7: tensor a is (3,)"),
        (update(7, 1, a=[float("nan"), 1.0], b=[[0.0]]), "client 7: tensor a has NaN or Inf"),
        (update(7, 1, a=[float("inf"), 1.0], b=[[0.0]]), "client 7: tensor a has NaN or Inf"),
        (ClientUpdate(7, 1, {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1, 1)}), "float64"),
        (update(7, -1, a=[0.0, 0.0], b=[[0.0]]), "client 7: num_examples"),
        (update(0, 1, a=[0.0, 0.0], b=[[0.0]]), "client 0: sent two updates in one round"),
    ],
)
def test_bad_updates_are_rejected_by_name(bad, message):
    with pytest.raises(AggregationError) as e:
        check_updates(GLOBAL, [update(0, 1, a=[0.0, 0.0], b=[[0.0]]), bad])
    assert message in str(e.value)


def test_no_updates_or_zero_weight():
    with pytest.raises(AggregationError, match="no client updates"):
        check_updates(GLOBAL, [])
    with pytest.raises(AggregationError, match="zero examples"):
        check_updates(GLOBAL, [update(0, 0, a=[0.0, 0.0], b=[[0.0]])])


def test_updates_come_back_in_client_order():
    ups = [update(c, 1, a=[0.0, 0.0], b=[[0.0]]) for c in (5, 2, 9)]
    assert [u.client_id for u in check_updates(GLOBAL, ups)] == [2, 5, 9]


# ----------------------------------------------------------------------------- hand-computed


def test_mean_weights_by_examples():
    # (1*[3, 0] + 2*[0, 3]) / 3 = [1, 2]
    out = Mean()([update(0, 10, a=[3.0, 0.0]), update(1, 20, a=[0.0, 3.0])])
    assert torch.allclose(out["a"], torch.tensor([1.0, 2.0]))


def test_median_odd_and_even_ignore_weights():
    odd = Median()([update(0, 1, a=[1.0, -4.0]), update(1, 1000, a=[5.0, 0.0]), update(2, 1, a=[3.0, 9.0])])
    assert torch.equal(odd["a"], torch.tensor([3.0, 0.0]))
    even = Median()([update(i, 1 + 99 * i, a=[v]) for i, v in enumerate([1.0, 2.0, 10.0, 4.0])])
    assert torch.equal(even["a"], torch.tensor([3.0]))  # sorted 1, 2, 4, 10: (2 + 4) / 2


def test_trimmed_mean_drops_both_ends():
    five = [update(i, 1, a=[v]) for i, v in enumerate([1.0, 100.0, 3.0, 2.0, 4.0])]
    assert torch.allclose(TrimmedMean(0.2)(five)["a"], torch.tensor([3.0]))  # t = 1: mean(2, 3, 4)
    assert torch.allclose(TrimmedMean(0.0)(five)["a"], torch.tensor([22.0]))  # t = 0: plain mean 110 / 5
    assert torch.allclose(TrimmedMean(0.3)(five)["a"], torch.tensor([3.0]))  # t = floor(1.5) = 1
    ten = [update(i, 1, a=[float(i)]) for i in range(10)]
    assert torch.allclose(TrimmedMean(0.3)(ten)["a"], torch.tensor([4.5]))  # t = 3 (not 2.999..): mean(3..6)


KRUM_UPDATES = [update(i, 1, a=[v]) for i, v in enumerate([0.0, 1.0, 2.0, 3.0, 100.0])]


def test_krum_scores_and_choice():
    # n = 5, f = 1: each score sums the n - f - 2 = 2 smallest squared distances
    # c0: 1, 4 -> 5; c1: 1, 1 -> 2; c2: 1, 1 -> 2; c3: 1, 4 -> 5; c4: 97^2 + 98^2
    scores = Krum(1).scores(KRUM_UPDATES)
    assert scores.tolist() == [5.0, 2.0, 2.0, 5.0, 97.0**2 + 98.0**2]
    assert torch.equal(Krum(1)(KRUM_UPDATES)["a"], torch.tensor([1.0]))  # tie c1/c2 goes to the lower id


def test_multikrum_averages_the_best_m():
    assert torch.equal(Krum(1, m=3)(KRUM_UPDATES)["a"], torch.tensor([1.0]))  # c1, c2, then c0 (tie with c3): (0+1+2)/3
    assert torch.equal(Krum(1, m=None)(KRUM_UPDATES)["a"], torch.tensor([1.5]))  # m = n - f = 4: (0+1+2+3)/4


def test_krum_distances_span_all_tensors():
    split = [ClientUpdate(i, 1, {"a": torch.tensor([x]), "b": torch.tensor([[y]])}) for i, (x, y) in enumerate([(0.0, 0.0), (1.0, 1.0), (2.0, 0.0), (0.0, 2.0), (50.0, 50.0)])]
    joint = [ClientUpdate(i, 1, {"a": torch.cat([u.delta["a"], u.delta["b"].reshape(-1)])}) for i, u in enumerate(split)]
    assert torch.equal(Krum(1).scores(split), Krum(1).scores(joint))


# ----------------------------------------------------------------------------- errors


def test_bad_aggregator_parameters_name_the_key():
    with pytest.raises(ConfigError, match=r"strategy.trim_beta: must be in \[0, 0.5\)"):
        TrimmedMean(0.5)
    with pytest.raises(ConfigError, match="strategy.krum_f: must be a non-negative integer"):
        Krum(-1)
    with pytest.raises(ConfigError, match="strategy.multikrum_m: must be a positive integer"):
        Krum(1, m=0)
    with pytest.raises(ConfigError, match="strategy.trim_beta: strategy.aggregator=median does not use it"):
        build_aggregator("median", trim_beta=0.1)
    with pytest.raises(ConfigError, match="strategy.krum_f: krum needs the number of attackers"):
        build_aggregator("krum")
    with pytest.raises(ConfigError, match="strategy.trim_beta: trimmed_mean needs"):
        build_aggregator("trimmed_mean")
    with pytest.raises(ConfigError, match="strategy.aggregator: 'mode' is not one of"):
        build_aggregator("mode")


def test_krum_refuses_too_few_updates_for_f():
    with pytest.raises(AggregationError, match=r"krum: 6 client updates this round, but strategy.krum_f=2 needs more than 2f\+2=6"):
        Krum(2)([update(i, 1, a=[float(i)]) for i in range(6)])
    with pytest.raises(AggregationError, match="strategy.multikrum_m=5 is more than the 5 updates of this round minus strategy.krum_f=1"):
        Krum(1, m=5)(KRUM_UPDATES)


def test_build_aggregator_registry():
    assert isinstance(build_aggregator(), Mean)
    assert isinstance(build_aggregator("median"), Median)
    assert build_aggregator("trimmed_mean", trim_beta=0.2).beta == 0.2
    k = build_aggregator("multikrum", krum_f=2, multikrum_m=3)
    assert (k.name, k.f, k.m) == ("multikrum", 2, 3)
    assert build_aggregator("krum", krum_f=1).m == 1


# ----------------------------------------------------------------------------- properties

finite = st.floats(-100, 100, allow_nan=False, width=32)
vec = st.lists(finite, min_size=3, max_size=3)
AGGREGATORS = [Mean(), Median(), TrimmedMean(0.2), Krum(1), Krum(1, m=None)]


@pytest.mark.parametrize("agg", AGGREGATORS, ids=lambda a: a.name)
@settings(max_examples=30, deadline=None)
@given(vals=vec, n=st.lists(st.integers(1, 50), min_size=5, max_size=8))
def test_identical_updates_give_that_update(agg, vals, n):
    ups = [ClientUpdate(i, k, {"a": torch.tensor(vals)}) for i, k in enumerate(n)]
    assert torch.allclose(agg(ups)["a"], torch.tensor(vals), atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(n=st.lists(st.integers(0, 1000), min_size=1, max_size=20).filter(lambda xs: sum(xs) > 0))
def test_weights_sum_to_one(n):
    ups = [ClientUpdate(i, k, {}) for i, k in enumerate(n)]
    assert sum(example_weights(ups)) == pytest.approx(1.0)


@pytest.mark.parametrize("agg", AGGREGATORS, ids=lambda a: a.name)
@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.tuples(vec, st.integers(1, 9)), min_size=5, max_size=8), perm_seed=st.integers(0, 1000))
def test_client_order_does_not_change_the_result_bit_for_bit(agg, rows, perm_seed):
    ups = [ClientUpdate(i, n, {"a": torch.tensor(v)}) for i, (v, n) in enumerate(rows)]
    shuffled = ups[:]
    random.Random(perm_seed).shuffle(shuffled)
    g = {"a": torch.tensor([0.5, -0.5, 0.0])}
    a, _ = FedAvg(agg).aggregate(g, ups, {})
    b, _ = FedAvg(agg).aggregate(g, shuffled, {})
    assert torch.equal(a["a"], b["a"])


honest_vec = st.lists(st.floats(-1, 1, width=32), min_size=4, max_size=4)
huge = st.floats(1e6, 1e30).flatmap(lambda x: st.sampled_from([x, -x]))
attack_vec = st.lists(huge, min_size=4, max_size=4)


def _mixed(honest, attackers):
    vs = honest + attackers
    ids = random.Random(len(vs)).sample(range(len(vs)), len(vs))  # attackers anywhere in the id order
    return [ClientUpdate(ids[i], 1, {"a": torch.tensor(v)}) for i, v in enumerate(vs)], torch.tensor(honest)


@settings(max_examples=40, deadline=None)
@given(honest=st.lists(honest_vec, min_size=3, max_size=7), attackers=st.lists(attack_vec, min_size=1, max_size=6), data=st.data())
def test_median_and_trimmed_mean_stay_in_the_honest_range(honest, attackers, data):
    attackers = attackers[: len(honest) - 1]  # a strict minority
    ups, h = _mixed(honest, attackers)
    lo, hi = h.min(dim=0).values, h.max(dim=0).values
    med = Median()(ups)["a"]
    assert ((med >= lo) & (med <= hi)).all()
    beta = data.draw(st.floats(len(attackers) / len(ups), 0.4999))  # trims at least the attackers at each end
    tm = TrimmedMean(beta)(ups)["a"]
    assert ((tm >= lo - 1e-6) & (tm <= hi + 1e-6)).all()


@settings(max_examples=40, deadline=None)
@given(honest=st.lists(honest_vec, min_size=5, max_size=8), attackers=st.lists(attack_vec, min_size=1, max_size=2))
def test_krum_and_multikrum_ignore_a_minority_of_huge_updates(honest, attackers):
    f = len(attackers)  # n = len(honest) + f >= 2f + 3
    ups, h = _mixed(honest, attackers)
    chosen = Krum(f)(ups)["a"]
    assert any(torch.equal(chosen, row) for row in h)  # Krum picks one of the honest deltas
    multi = Krum(f, m=None)(ups)["a"]
    assert ((multi >= h.min(dim=0).values - 1e-6) & (multi <= h.max(dim=0).values + 1e-6)).all()
