from collections import Counter

import numpy as np
import pytest

from fedtune.server.sampling import clients_per_round, local_steps_per_client, sample_clients


@pytest.mark.parametrize("n, count, fraction, want", [(10, 3, None, 3), (10, None, 0.25, 3), (10, None, 1.0, 10), (10, None, None, 10), (4, None, 0.01, 1)])
def test_clients_per_round(n, count, fraction, want):
    assert clients_per_round(n, count, fraction) == want


def test_uniform_sampling_is_seeded_distinct_sorted():
    a = sample_clients(100, 10, np.random.default_rng(3))
    assert a == sorted(set(a)) and len(a) == 10
    assert a == sample_clients(100, 10, np.random.default_rng(3))


def test_weighted_sampling_prefers_large_clients():
    sizes = [1] * 9 + [1000]
    hits = Counter()
    for seed in range(200):
        hits.update(sample_clients(10, 2, np.random.default_rng(seed), sizes))
    assert hits[9] > 190  # the big client is almost always picked
    assert sum(hits.values()) == 400


def test_full_participation():
    assert sample_clients(5, 5, np.random.default_rng(0)) == [0, 1, 2, 3, 4]


def test_local_steps_per_client_are_seeded_fixed_per_client_and_drawn_from_the_choices():
    a = local_steps_per_client([2, 4, 8], 200, seed=5)
    assert a == local_steps_per_client([2, 4, 8], 200, seed=5)
    assert set(a) == {2, 4, 8} and len(a) == 200
    assert a[:50] == local_steps_per_client([2, 4, 8], 50, seed=5)  # a client's draw does not depend on the others
    assert a != local_steps_per_client([2, 4, 8], 200, seed=6)
    assert local_steps_per_client([], 10, seed=0) is None
    assert local_steps_per_client([3], 4, seed=0) == [3, 3, 3, 3]
