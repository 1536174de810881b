from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.data import partition as part
from fedtune.errors import ConfigError


def cats(n_per=20, names="abcde"):
    return [c for c in names for _ in range(n_per)]


def rng(seed=0):
    return np.random.default_rng(seed)


def assert_disjoint_cover(parts, ids):
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "a row is on two clients"
    assert sorted(flat) == sorted(ids)


def test_holdout_takes_k_per_category_and_is_disjoint():
    c = cats()
    train, test = part.holdout_split(c, 3, rng())
    assert Counter(c[i] for i in test) == {k: 3 for k in "abcde"}
    assert not set(train) & set(test)
    assert sorted(train + test) == list(range(len(c)))


def test_holdout_keeps_half_of_tiny_categories():
    c = ["a"] * 4 + ["b"] * 50
    train, test = part.holdout_split(c, 10, rng())
    assert Counter(c[i] for i in test) == {"a": 2, "b": 10}


def test_iid_sizes_and_seed():
    ids = list(range(103))
    parts = part.iid(ids, 10, rng(1))
    assert_disjoint_cover(parts, ids)
    assert {len(p) for p in parts} <= {10, 11}
    assert parts == part.iid(ids, 10, rng(1))
    assert parts != part.iid(ids, 10, rng(2))


def test_shards_give_each_client_few_categories():
    c = cats(40)  # 5 categories x 40 rows
    ids = list(range(len(c)))
    parts = part.shards(ids, c, num_clients=5, shards_per_client=2, rng=rng())
    assert_disjoint_cover(parts, ids)
    assert all(len(p) == 40 for p in parts)
    # 10 shards of 20 rows over categories of 40 rows: every shard is pure, so <= 2 categories per client
    assert all(len({c[i] for i in p}) <= 2 for p in parts)
    assert parts == part.shards(ids, c, 5, 2, rng())


def test_dirichlet_skew_grows_as_alpha_shrinks():
    c = cats(100)
    ids = list(range(len(c)))

    def mean_max_share(alpha):
        parts = part.dirichlet(ids, c, 5, alpha, 1, rng(3))
        assert_disjoint_cover(parts, ids)
        return np.mean([max(Counter(c[i] for i in p).values()) / len(p) for p in parts])

    assert mean_max_share(0.05) > mean_max_share(100.0)


def test_dirichlet_minimum_per_client():
    c = cats(30)
    parts = part.dirichlet(list(range(len(c))), c, 6, 0.3, 5, rng())
    assert min(len(p) for p in parts) >= 5


def test_dirichlet_impossible_minimum_is_a_config_error():
    c = cats(3, "ab")
    with pytest.raises(ConfigError, match="partition.min_per_client"):
        part.dirichlet(list(range(len(c))), c, 3, 0.5, 3, rng())


def test_dirichlet_tops_up_when_no_draw_meets_the_minimum():
    c = ["a"] * 8  # one category, 8 rows, 7 clients: Dir(0.05) draws almost never give everyone a row
    parts = part.dirichlet(list(range(8)), c, 7, 0.05, 1, rng(), max_tries=3)
    assert min(len(p) for p in parts) >= 1
    assert sorted(i for p in parts for i in p) == list(range(8))


def test_too_many_clients_is_a_config_error():
    with pytest.raises(ConfigError, match="fewer than the 10 rows"):
        part.iid(list(range(5)), 10, rng())
    with pytest.raises(ConfigError, match="shards"):
        part.shards(list(range(5)), ["a"] * 5, 3, 2, rng())


def test_category_table():
    c = ["a", "b", "a"]
    assert part.category_table([[0, 1], [2]], c) == {0: {"a": 1, "b": 1}, 1: {"a": 1}}


@settings(max_examples=60, deadline=None)
@given(
    n_cats=st.integers(1, 6),
    per=st.integers(4, 30),
    clients=st.integers(1, 8),
    method=st.sampled_from(["iid", "shards", "dirichlet"]),
    seed=st.integers(0, 10_000),
)
def test_every_partition_is_a_disjoint_cover(n_cats, per, clients, method, seed):
    c = cats(per, "abcdef"[:n_cats])
    train, test = part.holdout_split(c, 1, rng(seed))
    if method == "iid":
        parts = part.iid(train, min(clients, len(train)), rng(seed))
    elif method == "shards":
        k = min(clients, len(train) // 2)
        if k < 1:
            return
        parts = part.shards(train, c, k, 2, rng(seed))
    else:
        parts = part.dirichlet(train, c, min(clients, len(train)), 0.5, 1, rng(seed))
    assert_disjoint_cover(parts, train)
    assert not {i for p in parts for i in p} & set(test)
