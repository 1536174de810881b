"""Explicit randomness: every random choice draws from a generator derived from
(config seed, stream, round, client, ...). Nothing is seeded globally, and since no
generator carries state from one round to the next, a resumed run replays exactly the
schedule of an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

STREAMS = {"partition": 0, "sampling": 1, "batches": 2, "torch": 3, "init": 4, "noise": 5, "failures": 6, "attack": 7, "workload": 8, "local": 9, "ranks": 10, "client-holdout": 11, "federated-eval": 12, "bootstrap": 13}


def generator(seed: int, stream: str, *ids: int) -> np.random.Generator:
    """A numpy Generator for one stream and position, e.g. ``generator(seed, "sampling", round)``."""
    return np.random.default_rng([seed, STREAMS[stream], *ids])


def torch_seed(seed: int, stream: str, *ids: int) -> int:
    """A 63-bit seed for a torch generator, derived like :func:`generator`."""
    return int(np.random.SeedSequence([seed, STREAMS[stream], *ids]).generate_state(1, dtype=np.uint64)[0] >> 1)
