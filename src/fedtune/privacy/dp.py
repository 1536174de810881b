"""Client-level differential privacy for federated averaging (DP-FedAvg).

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models"
(ICLR 2018): every client's update is clipped to L2 norm ``C`` over all adapter tensors,

    clip(Δ) = Δ · min(1, C / ||Δ||₂)

the server averages the clipped updates with equal weights (example counts would leak and
are unbounded) and adds Gaussian noise of standard deviation ``z·C`` to their *sum*:

    Δ̄ = (Σ_i clip(Δ_i) + N(0, z²C²·I)) / K

``central``: the (trusted) server adds the noise once. ``local``: every client adds
``N(0, z²C²·I)`` to its own clipped update before sending it, so no party sees a clean
update (at the price of K times the noise variance in the sum).

The privacy loss is tracked with Google's ``dp_accounting`` RDP accountant for the sampled
Gaussian mechanism composed over rounds: Poisson sampling with rate q under add/remove-one
adjacency, or fixed-size sampling without replacement of K of N clients under replace-one
adjacency (where one client's update moves the sum by up to 2C, so the noise multiplier
the accountant sees is z/2).

Sampling can only amplify privacy, so the round's RDP is, order by order, the smaller of the
sampled-Gaussian bound and the plain Gaussian mechanism's ``alpha / (2 z_eff^2)`` (z_eff = z,
or z/2 under replace-one): every client takes part in the worst case. dp_accounting's
fixed-size bound is looser than that for K close to N (N=100, z=1, 50 rounds: K=99 gave
epsilon 244 against 166 for K=100), which made epsilon grow when fewer clients were sampled.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fedtune.types import Adapter


def l2_norm(adapter: Adapter) -> float:
    """||Δ||₂ over all tensors of an adapter (as one flat vector)."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in adapter.values()))


def clip(adapter: Adapter, max_norm: float) -> tuple[Adapter, float]:
    """(Δ · min(1, C / ||Δ||), ||Δ||)."""
    norm = l2_norm(adapter)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in adapter.items()}, norm


def gaussian_like(adapter: Adapter, std: float, generator: torch.Generator) -> Adapter:
    """Independent N(0, std²) noise shaped like ``adapter`` (float32, CPU), in key order."""
    return {k: torch.randn(v.shape, generator=generator, dtype=torch.float32) * std for k, v in sorted(adapter.items())}


def noisy_sum(clipped: Sequence[Adapter], noise_multiplier: float, max_norm: float, generator: torch.Generator) -> Adapter:
    """Σ_i clip(Δ_i) + N(0, (z·C)²): the central-DP release of one round."""
    total = {k: sum(c[k] for c in clipped) for k in clipped[0]}
    noise = gaussian_like(total, noise_multiplier * max_norm, generator)
    return {k: total[k] + noise[k] for k in total}


def epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    *,
    population: int,
    per_round: int,
    sampling: str = "fixed",
) -> float:
    """ε of ``rounds`` rounds of the sampled Gaussian mechanism at ``delta``.

    Args:
        noise_multiplier: z, noise std relative to the clipping norm.
        population: N, clients that could be sampled.
        per_round: K, clients per round (``poisson``: the expected number, q = K/N).
        sampling: ``fixed`` (K of N without replacement) or ``poisson``.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting as dpa

    if sampling == "poisson":
        relation, noise = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, noise_multiplier
        sampled = dpa.PoissonSampledDpEvent(per_round / population, dpa.GaussianDpEvent(noise))
    else:
        relation, noise = dpa.NeighboringRelation.REPLACE_ONE, noise_multiplier / 2
        sampled = dpa.SampledWithoutReplacementDpEvent(population, per_round, dpa.GaussianDpEvent(noise))
    return min(_rdp_epsilon(sampled, rounds, delta, relation), _rdp_epsilon(dpa.GaussianDpEvent(noise), rounds, delta, relation))


def _rdp_epsilon(event, rounds: int, delta: float, relation) -> float:
    """epsilon of ``event`` composed ``rounds`` times, from dp_accounting's RDP accountant.

    The accountant converts RDP to epsilon order by order and keeps the smallest, and that
    conversion grows with the RDP value; so min(epsilon of A, epsilon of B), over the same
    orders, is the epsilon of the order-wise minimum of A's and B's RDP (module docstring),
    computed with public dp_accounting calls only."""
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=relation)
    accountant.compose(dpa.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))
