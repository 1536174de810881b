"""How the server reaches its clients. In-process: every client fit runs here, one after
another, on the one shared model. (A distributed engine sends the same requests over the
network and gets the same ClientUpdates back; the round loop does not change.)"""

from __future__ import annotations

from typing import Sequence

from fedtune.client.sft import LocalTrainer
from fedtune.data.prompts import Encoded
from fedtune.reporting.progress import Progress
from fedtune.types import Adapter, ClientUpdate


class LocalClients:
    """All clients of a simulation: their data, and the one trainer that serves them."""

    def __init__(self, trainer: LocalTrainer, data: Sequence[Sequence[Encoded]], progress: Progress):
        self.trainer, self.data, self.progress = trainer, data, progress

    def __len__(self) -> int:
        return len(self.data)

    def sizes(self) -> list[int]:
        return [len(d) for d in self.data]

    def steps(self, client: int, round: int) -> int:
        return len(self.trainer.plan(client, round, self.data[client]))

    def fit(self, round: int, clients: Sequence[int], global_adapter: Adapter, client_config: dict, lr: float) -> list[ClientUpdate]:
        updates = []
        for cid in clients:
            self.progress.client_started(round, cid, self.steps(cid, round))
            update = self.trainer.fit(
                cid, self.data[cid], global_adapter, round=round, lr=lr, client_config=client_config, on_step=self.progress.step
            )
            self.progress.client_finished(round, cid, update.metrics)
            updates.append(update)
        return updates
