"""DP-FedAvg in the round loop: where clipping and noise happen, and how much privacy is spent.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models"
(ICLR 2018), on adapter deltas, with K clients sampled per round out of N, clip norm C and
noise multiplier z (the math itself is in :mod:`fedtune.privacy.dp`):

``central``  the server clips every validated delta and releases, once per round,

                 Delta_t = (sum_i clip_C(d_i) + N(0, z^2 C^2 I)) / K

             with equal weights (example counts are unbounded and would leak) and the fixed
             denominator K, the clients *sampled*, not those that answered: a data-dependent
             count would change the sensitivity (McMahan et al.'s fixed-denominator
             estimator). The strategy then treats Delta_t as the round's only update, so
             FedAvg, FedAvgM, FedProx and the adaptive server optimisers apply their server
             step to the private aggregate (post-processing: no extra privacy cost).
             The accountant: K-of-N sampling without replacement, replace-one adjacency,
             composed over the rounds run (``dp.epsilon(..., sampling="fixed")``).
             The guarantee is client-level and holds against everyone who sees only the
             released aggregates (other clients, users of the model), *trusting the server*,
             which sees the clean deltas.
``local``    every client clips its own delta and adds N(0, z^2 C^2 I) before sending it, so
             the server never sees a clean update; the server then aggregates as configured
             (any aggregator is post-processing). The accountant reports the guarantee
             against the server: the server knows who was sampled, so there is no
             amplification by sampling, and a client may be sampled every round: the
             Gaussian mechanism with sensitivity 2C (replace-one) composed over every round
             run, i.e. ``dp.epsilon`` with N = K = 1.

Noise draws come from generator(seed, "noise", round) (central) or (seed, "noise", round,
client) (local), so a resumed run adds the same noise as an uninterrupted one. Epsilon counts
every round run, skipped ones included: an upper bound.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fedtune.privacy import dp
from fedtune.seeding import torch_seed
from fedtune.types import ClientUpdate

RELEASE_ID = -1  # client id of the server's private aggregate, the one update the strategy sees


class DPFedAvg:
    """Clipping, noise and accounting of one run (``mode`` central or local)."""

    def __init__(
        self, mode: str, *, clip_norm: float, noise_multiplier: float, delta: float, population: int,
        per_round: int, seed: int, target_epsilon: Optional[float] = None,
    ):
        assert mode in ("central", "local"), mode  # config.py checks privacy.dp
        self.mode, self.clip_norm, self.z, self.delta = mode, clip_norm, noise_multiplier, delta
        self.population, self.per_round, self.seed, self.target = population, per_round, seed, target_epsilon
        self._epsilons: dict[int, float] = {}  # rounds -> epsilon (an accountant call takes ~0.3 s)

    # ------------------------------------------------------------------ server and client side

    def release(self, updates: Sequence[ClientUpdate], sampled: int, round: int) -> ClientUpdate:
        """Central DP: (sum_i clip_C(d_i) + N(0, (zC)^2)) / ``sampled``, as one update."""
        clipped = [dp.clip(u.delta, self.clip_norm)[0] for u in updates]
        noisy = dp.noisy_sum(clipped, self.z, self.clip_norm, self._generator(round))
        mean = {k: (v / sampled).contiguous() for k, v in noisy.items()}
        return ClientUpdate(RELEASE_ID, sum(u.num_examples for u in updates), mean, {"dp_clients": len(updates)})

    def privatize(self, update: ClientUpdate, round: int) -> ClientUpdate:
        """Local DP, on the client: clip_C(d) + N(0, (zC)^2), before the update leaves it."""
        clipped, norm = dp.clip(update.delta, self.clip_norm)
        noise = dp.gaussian_like(clipped, self.z * self.clip_norm, self._generator(round, update.client_id))
        delta = {k: clipped[k] + noise[k] for k in clipped}
        metrics = {**update.metrics, "clipped_from": norm}
        return ClientUpdate(update.client_id, update.num_examples, delta, metrics, update.control_delta, update.rank)

    def _generator(self, round: int, *client: int) -> torch.Generator:
        return torch.Generator().manual_seed(torch_seed(self.seed, "noise", round, *client))

    # ------------------------------------------------------------------ accounting

    def epsilon(self, rounds: int) -> float:
        """epsilon after ``rounds`` rounds at ``delta`` (see the module docstring)."""
        if rounds not in self._epsilons:
            n, k = (1, 1) if self.mode == "local" else (self.population, self.per_round)
            self._epsilons[rounds] = dp.epsilon(self.z, rounds, self.delta, population=n, per_round=k, sampling="fixed")
        return self._epsilons[rounds]

    def last_round(self, total: int) -> int:
        """The last round (<= ``total``) whose epsilon stays within ``target_epsilon``
        (epsilon grows with rounds, so a binary search)."""
        if self.target is None:
            return total
        lo, hi = 0, total  # epsilon(lo) <= target always (epsilon(0) = 0)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.epsilon(mid) <= self.target:
                lo = mid
            else:
                hi = mid - 1
        return lo


def epsilon_fields(privacy: Optional[DPFedAvg], rounds: int) -> dict:
    """``{"epsilon": ..., "delta": ...}`` for a metrics line ({} without DP)."""
    if privacy is None:
        return {}
    return {"epsilon": privacy.epsilon(rounds), "delta": privacy.delta}
