"""Which clients train in a round, and how much work each does. Pure functions of sizes,
settings and seeded generators."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from fedtune.seeding import generator


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


def local_steps_per_client(choices: Sequence[int], num_clients: int, seed: int, stream: str = "workload") -> Optional[list[int]]:
    """Heterogeneous local work: each client's optimizer steps per round (or, with
    stream="ranks", its LoRA rank), drawn once and uniformly from ``choices`` with the
    generator of (seed, stream, client), so a client keeps its capacity across rounds and
    resumes. None when ``choices`` is empty (all equal)."""
    if not choices:
        return None
    return [int(choices[generator(seed, stream, c).integers(len(choices))]) for c in range(num_clients)]
