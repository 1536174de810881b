"""Which clients train in a round. Pure functions of sizes and a Generator."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def clients_per_round(num_clients: int, count: Optional[int], fraction: Optional[float]) -> int:
    """``count``, else ``ceil(fraction * num_clients)``, else all clients (at least one)."""
    if count is not None:
        return min(count, num_clients)
    if fraction is not None:
        return max(1, min(num_clients, int(np.ceil(fraction * num_clients - 1e-9))))
    return num_clients


def sample_clients(
    num_clients: int, k: int, rng: np.random.Generator, sizes: Optional[Sequence[int]] = None
) -> list[int]:
    """``k`` distinct client ids, uniformly or with probability proportional to ``sizes``
    (data size), in ascending order."""
    if k >= num_clients:
        return list(range(num_clients))
    p = None
    if sizes is not None:
        sizes = np.asarray(sizes, dtype=np.float64)
        p = sizes / sizes.sum()
    return sorted(rng.choice(num_clients, size=k, replace=False, p=p).tolist())
