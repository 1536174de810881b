"""Learning rate across rounds (clients restart their optimizer each round)."""

from __future__ import annotations

import math


def round_lr(round: int, total_rounds: int, lr: float, schedule: str = "constant", min_lr: float = 0.0) -> float:
    """Peak lr for ``round`` (1-based): constant, or decayed from ``lr`` at round 1 to
    ``min_lr`` at the last round, linearly or along a half cosine (as in OpenFedLLM)."""
    if schedule == "constant" or total_rounds <= 1:
        return lr
    progress = (round - 1) / (total_rounds - 1)  # 0 at the first round, 1 at the last
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
