"""How the server reaches its clients. In-process: every client fit runs here, one after
another, on the one shared model. (A distributed engine sends the same requests over the
network and gets the same ClientUpdates back; the round loop does not change.)

This is also where the in-process engine simulates what real clients do: fail to answer
(``dropout``), differ in how much work they do per round (``local_steps``), and keep their
own state across rounds (SCAFFOLD's control variates, in a :class:`ClientStateStore`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fedtune.client.sft import LocalTrainer
from fedtune.data.prompts import Encoded
from fedtune.errors import CheckpointError
from fedtune.federation.attacks import ClientSide
from fedtune.federation.client_state import ClientStateStore
from fedtune.reporting.progress import Progress
from fedtune.seeding import generator
from fedtune.types import SERVER_CONTROL, Adapter, ClientFailure, ClientUpdate


class LocalClients:
    """All clients of a simulation: their data, and the one trainer that serves them.

    ``dropout``: probability that a sampled client fails to return its update, drawn from
    (seed, "failures", round, client), so a resumed run fails the same clients.
    ``local_steps``: optimizer steps per round for each client (None: the trainer's own).
    ``state``: where clients keep state between rounds (needed by SCAFFOLD).
    ``round_steps`` (round -> optimizer steps) fixes every fit's step budget instead; the
    centralized baseline uses it (federation/baselines.py).
    ``client_side``: what a client does to its update before sending it (simulated attacks,
    local DP; federation/attacks.py).
    """

    def __init__(
        self,
        trainer: LocalTrainer,
        data: Sequence[Sequence[Encoded]],
        progress: Progress,
        *,
        seed: int = 0,
        dropout: float = 0.0,
        local_steps: Optional[Sequence[int]] = None,
        state: Optional[ClientStateStore] = None,
        round_steps: Optional[dict[int, int]] = None,
        client_side: Optional[ClientSide] = None,
    ):
        self.trainer, self.data, self.progress = trainer, data, progress
        self.seed, self.dropout, self.local_steps, self.state = seed, dropout, local_steps, state
        self.round_steps = round_steps or {}
        self.client_side = client_side

    def __len__(self) -> int:
        return len(self.data)

    def sizes(self) -> list[int]:
        return [len(d) for d in self.data]

    def fails(self, client: int, round: int) -> bool:
        """Whether ``client`` drops out of ``round`` (simulated, seeded)."""
        return self.dropout > 0 and generator(self.seed, "failures", round, client).random() < self.dropout

    def _local_steps(self, client: int, round: int) -> Optional[int]:
        """The fit's step budget: the round's fixed one, else the client's own, else None
        (the trainer's train.local_steps/local_epochs)."""
        if round in self.round_steps:
            return self.round_steps[round]
        return None if self.local_steps is None else self.local_steps[client]

    def steps(self, client: int, round: int) -> int:
        if self.fails(client, round):
            return 0
        return len(self.trainer.plan(client, round, self.data[client], self._local_steps(client, round)))

    def fit(
        self, round: int, clients: Sequence[int], global_adapter: Adapter, client_config: dict, lr: float
    ) -> tuple[list[ClientUpdate], list[ClientFailure]]:
        """Fit every client of the round; returns (updates, failures)."""
        updates, failures = [], []
        for cid in clients:
            if self.fails(cid, round):
                failures.append(ClientFailure(cid, f"simulated dropout (federation.dropout={self.dropout})"))
                continue
            control = self._control(cid, round, client_config)
            self.progress.client_started(round, cid, self.steps(cid, round))
            update = self.trainer.fit(
                cid, self.data[cid], global_adapter, round=round, lr=lr, client_config=client_config,
                client_control=control, local_steps=self._local_steps(cid, round), on_step=self.progress.step,
            )
            if update.control_delta is not None:  # the client keeps c_i^+ = c_i + Delta c_i
                self.state.save(cid, round, {k: control[k] + update.control_delta[k] for k in control})
            self.progress.client_finished(round, cid, update.metrics)
            updates.append(update if self.client_side is None else self.client_side.outgoing(update, round))
        return updates, failures

    def _control(self, client: int, round: int, client_config: dict) -> Optional[Adapter]:
        """The client's SCAFFOLD variate c_i (zeros before its first round), or None."""
        server_control = client_config.get(SERVER_CONTROL)
        if server_control is None:
            return None
        assert self.state is not None, "SCAFFOLD clients need a ClientStateStore"
        stored = self.state.load(client, round)
        if stored is None:
            return {k: torch.zeros_like(v) for k, v in server_control.items()}
        if stored.keys() != server_control.keys() or any(stored[k].shape != v.shape for k, v in server_control.items()):
            raise CheckpointError(
                f"{self.state.root}: client {client}'s stored control variate does not fit this adapter; start a new run"
            )
        return stored

    def rollback(self, round: int) -> None:
        """Forget client state written in ``round`` or later (resume, or a skipped round)."""
        if self.state is not None:
            self.state.rollback(round)
