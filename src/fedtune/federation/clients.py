"""How the server reaches its clients. In-process: every client fit runs here, one after
another, on the one shared model. (A distributed engine sends the same requests over the
network and gets the same ClientUpdates back; the round loop does not change.)"""

from __future__ import annotations

from typing import Optional, Sequence

from fedtune.client.sft import LocalTrainer
from fedtune.data.prompts import Encoded
from fedtune.reporting.progress import Progress
from fedtune.types import Adapter, ClientUpdate


class LocalClients:
    """All clients of a simulation: their data, and the one trainer that serves them.

    ``round_steps`` (round -> optimizer steps) fixes every fit's step budget instead of
    train.local_steps/local_epochs; the centralized baseline uses it (federation/baselines.py)."""

    def __init__(
        self,
        trainer: LocalTrainer,
        data: Sequence[Sequence[Encoded]],
        progress: Progress,
        round_steps: Optional[dict[int, int]] = None,
    ):
        self.trainer, self.data, self.progress = trainer, data, progress
        self.round_steps = round_steps or {}

    def _budget(self, round: int) -> dict:
        return {"max_steps": self.round_steps[round]} if round in self.round_steps else {}

    def __len__(self) -> int:
        return len(self.data)

    def sizes(self) -> list[int]:
        return [len(d) for d in self.data]

    def steps(self, client: int, round: int) -> int:
        return len(self.trainer.plan(client, round, self.data[client], **self._budget(round)))

    def fit(self, round: int, clients: Sequence[int], global_adapter: Adapter, client_config: dict, lr: float) -> list[ClientUpdate]:
        updates = []
        for cid in clients:
            self.progress.client_started(round, cid, self.steps(cid, round))
            update = self.trainer.fit(
                cid, self.data[cid], global_adapter, round=round, lr=lr, client_config=client_config,
                on_step=self.progress.step, **self._budget(round),
            )
            self.progress.client_finished(round, cid, update.metrics)
            updates.append(update)
        return updates
