"""Split rows across clients: IID, category shards, Dirichlet over categories; plus the
global held-out set. Pure functions of (categories, settings, numpy Generator).

Row ids are positions in the loaded example list. Every function returns disjoint id lists,
sorted within each client, so the same seed always gives the same partition.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from fedtune.errors import ConfigError


def holdout_split(categories: Sequence[str], per_category: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Take ``per_category`` random rows of every category out as the test set.

    Returns (train_ids, test_ids). A category with no more than ``per_category`` rows keeps
    half of them for training, so no category disappears from training entirely.
    """
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        by_cat[c].append(i)
    test: list[int] = []
    for cat in sorted(by_cat):
        ids = by_cat[cat]
        k = min(per_category, len(ids) // 2) if len(ids) <= per_category else per_category
        test.extend(rng.choice(ids, size=k, replace=False).tolist())
    test_set = set(test)
    return [i for i in range(len(categories)) if i not in test_set], sorted(test)


def iid(ids: Sequence[int], num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle and deal rows into ``num_clients`` near-equal parts."""
    _need(len(ids), num_clients, "rows")
    perm = rng.permutation(np.asarray(ids, dtype=np.int64))
    return [sorted(part.tolist()) for part in np.array_split(perm, num_clients)]


def shards(
    ids: Sequence[int], categories: Sequence[str], num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[list[int]]:
    """The FedIT/Shepherd pathological non-IID split.

    Rows are sorted by category (random order within a category), cut into
    ``num_clients * shards_per_client`` contiguous shards of near-equal size, and each client
    gets ``shards_per_client`` shards at random. Most clients therefore see one or two
    categories only.
    """
    n_shards = num_clients * shards_per_client
    _need(len(ids), n_shards, "rows for partition.num_clients * partition.shards_per_client shards")
    ids = np.asarray(ids, dtype=np.int64)
    order = ids[rng.permutation(len(ids))]
    order = sorted(order.tolist(), key=lambda i: categories[i])  # stable: random within category
    pieces = np.array_split(np.asarray(order, dtype=np.int64), n_shards)
    assignment = rng.permutation(n_shards)
    return [
        sorted(np.concatenate([pieces[s] for s in assignment[c * shards_per_client : (c + 1) * shards_per_client]]).tolist())
        for c in range(num_clients)
    ]


def dirichlet(
    ids: Sequence[int],
    categories: Sequence[str],
    num_clients: int,
    alpha: float,
    min_per_client: int,
    rng: np.random.Generator,
    max_tries: int = 100,
) -> list[list[int]]:
    """Label-skew split: for each category, client shares are drawn from Dir(alpha).

    Draws again (up to ``max_tries``) until every client has at least ``min_per_client`` rows,
    as in Hsu et al. 2019 / the usual FL benchmarks; smaller alpha gives more skew. If no
    draw satisfies the minimum (tiny data, many clients, small alpha), the best draw is
    topped up: clients short of the minimum take random rows from the largest clients.
    """
    _need(len(ids), num_clients * min_per_client, "rows for partition.min_per_client on every client")
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i in ids:
        by_cat[categories[i]].append(i)
    best: list[list[int]] = []
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cat in sorted(by_cat):
            rows = rng.permutation(np.asarray(by_cat[cat], dtype=np.int64))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for client, chunk in enumerate(np.split(rows, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_per_client:
            return [sorted(p) for p in parts]
        if not best or min(map(len, parts)) > min(map(len, best)):
            best = parts
    return [sorted(p) for p in _top_up(best, min_per_client, rng)]


def _top_up(parts: list[list[int]], minimum: int, rng: np.random.Generator) -> list[list[int]]:
    """Move random rows from the largest clients to those below ``minimum``."""
    for client in range(len(parts)):
        while len(parts[client]) < minimum:
            donor = max(range(len(parts)), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return parts


def _need(have: int, need: int, what: str) -> None:
    if have < need:
        raise ConfigError(f"partition: {have} training rows are fewer than the {need} {what}; use fewer clients or more data")


def category_table(parts: Sequence[Sequence[int]], categories: Sequence[str]) -> dict[int, dict[str, int]]:
    """Examples per category for each client: {client: {category: count}}."""
    return {c: dict(sorted(Counter(categories[i] for i in part).items())) for c, part in enumerate(parts)}


def client_holdout(num_rows: int, fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Split one client's ``num_rows`` rows (positions 0..n-1) into (train, held out) for
    federated evaluation: ``round(fraction * n)`` random rows held out, at least one and at
    most n - 1 when n >= 2, none when n < 2 (a client's only row trains). Both lists ascending."""
    k = 0 if num_rows < 2 else min(num_rows - 1, max(1, int(round(fraction * num_rows))))
    held = set(rng.choice(num_rows, size=k, replace=False).tolist()) if k else set()
    return [i for i in range(num_rows) if i not in held], sorted(held)
