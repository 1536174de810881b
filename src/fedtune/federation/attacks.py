"""Simulated malicious clients, acting where a real one would: on its own training data
before training, or on its update after an honest fit, before sending it.

Who is malicious: ``floor(fraction * N)`` clients drawn once per run, without replacement,
from generator(seed, "attack"), so every engine and every resumed run has the same ones.

Update attacks (the client trains honestly, then sends something else; s = ``attack.scale``):

    sign_flip   -s * d                   (pushes the global model away from the honest descent)
    scale       s * d                    (a "boosted" update that outweighs the others in a mean)
    gaussian    s * ||d|| * g / ||g||    g ~ N(0, I) from (seed, "attack", round, client): noise
                                         with the norm of an honest update (hard to spot by norm)

Data attacks (the client follows the protocol on poisoned data):

    poison      every example's answer is replaced by a fixed string (label/response flipping)
    backdoor    a trigger phrase is appended to ``poison_fraction`` of the client's prompts,
                whose answer becomes a fixed target (Bagdasaryan et al., "How To Backdoor
                Federated Learning", AISTATS 2020)

A client that sends an update attack does not follow the protocol, so it skips local DP;
a data attacker does follow it (its updates are clipped and noised like everyone's).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

from fedtune.config import UPDATE_ATTACKS
from fedtune.data.sources import Example
from fedtune.privacy.dp import l2_norm
from fedtune.privacy.dpfedavg import DPFedAvg
from fedtune.seeding import generator, torch_seed
from fedtune.types import Adapter, ClientUpdate


def malicious_clients(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The ``floor(fraction * num_clients)`` malicious client ids, sorted."""
    count = math.floor(fraction * num_clients + 1e-9)  # 1e-9: 0.3 * 10 is 3, not 2.999...
    if count == 0:
        return []
    return sorted(int(c) for c in generator(seed, "attack").choice(num_clients, size=count, replace=False))


def attack_delta(delta: Adapter, kind: str, scale: float, noise: torch.Generator) -> Adapter:
    """What a malicious client sends instead of its honest ``delta`` (see the module docstring)."""
    if kind == "sign_flip":
        return {k: -scale * v for k, v in delta.items()}
    if kind == "scale":
        return {k: scale * v for k, v in delta.items()}
    if kind == "gaussian":
        g = {k: torch.randn(v.shape, generator=noise, dtype=torch.float32) for k, v in sorted(delta.items())}
        factor = scale * l2_norm(delta) / max(l2_norm(g), 1e-30)
        return {k: g[k] * factor for k in delta}
    raise ValueError(f"not an update attack: {kind!r}")  # internal: config.py checks attack.kind


def poison_examples(
    examples: Sequence[Example], kind: str, *, poison_text: str, trigger: str, target: str, poison_fraction: float, rng
) -> list[Example]:
    """A malicious client's training data: ``poison`` replaces every answer by ``poison_text``;
    ``backdoor`` appends ``trigger`` to ``ceil(poison_fraction * n)`` prompts drawn from
    ``rng`` and answers them with ``target`` (the rest stay clean, so the client looks normal)."""
    if kind == "poison":
        return [dataclasses.replace(e, output=poison_text) for e in examples]
    if kind == "backdoor":
        n = len(examples)
        chosen = set(int(i) for i in rng.choice(n, size=min(n, math.ceil(poison_fraction * n - 1e-9)), replace=False))
        return [
            dataclasses.replace(e, instruction=f"{e.instruction} {trigger}", output=target) if i in chosen else e
            for i, e in enumerate(examples)
        ]
    raise ValueError(f"not a data attack: {kind!r}")  # internal: config.py checks attack.kind


class ClientSide:
    """What happens on a client beyond honest training: the attack of a malicious client,
    and local DP. The in-process engine (LocalClients) and the Flower ClientApp both use it."""

    def __init__(
        self, *, seed: int, malicious: Sequence[int] = (), kind: str = "sign_flip", scale: float = 1.0,
        poison_text: str = "", trigger: str = "", target: str = "", poison_fraction: float = 0.5,
        local_dp: Optional[DPFedAvg] = None,
    ):
        self.seed, self.malicious, self.kind, self.scale = seed, frozenset(malicious), kind, scale
        self.poison = dict(poison_text=poison_text, trigger=trigger, target=target, poison_fraction=poison_fraction)
        self.local_dp = local_dp

    def training_examples(self, client: int, examples: Sequence[Example]) -> Sequence[Example]:
        """The examples ``client`` trains on (poisoned if it is a data attacker)."""
        if client not in self.malicious or self.kind in UPDATE_ATTACKS:
            return examples
        return poison_examples(examples, self.kind, rng=generator(self.seed, "attack", client), **self.poison)

    def outgoing(self, update: ClientUpdate, round: int) -> ClientUpdate:
        """The update ``update.client_id`` sends after its fit in ``round``."""
        cid = update.client_id
        if cid in self.malicious:
            update = dataclasses.replace(update, metrics={**update.metrics, "malicious": True})
            if self.kind in UPDATE_ATTACKS:
                noise = torch.Generator().manual_seed(torch_seed(self.seed, "attack", round, cid))
                return dataclasses.replace(update, delta=attack_delta(update.delta, self.kind, self.scale, noise))
        if self.local_dp is not None:
            return self.local_dp.privatize(update, round)
        return update
