"""How the round loop reaches its clients: the :class:`Clients` protocol, and its in-process
transport :class:`LocalClients`, where every client fit runs here, one after another, on the
one shared model. (The Flower transport, federation/flower/transport.py, sends the same
requests as messages; each node runs the same client pipeline, federation/client_fit.py, and
the round loop cannot tell the two apart.)

This is also where the in-process engine simulates what real clients do: fail to answer
(``dropout``, seeded, reported as ``ClientFailure(simulated=True)``), differ in how much work
they do per round (``local_steps``), and train a lower LoRA rank (``ranks``, HetLoRA). What
a client does with its fit (attack / local DP, compression with error feedback, SCAFFOLD's
control variates kept in a :class:`ClientStateStore` on disk) is the client pipeline's.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

from fedtune.client.sft import LocalTrainer
from fedtune.data.prompts import Encoded
from fedtune.federation.attacks import ClientSide
from fedtune.federation.client_eval import ClientHoldout
from fedtune.federation.client_fit import ClientPipeline
from fedtune.federation.client_state import ClientStateStore
from fedtune.federation.compression import Compression
from fedtune.reporting.progress import Progress
from fedtune.seeding import generator
from fedtune.types import Adapter, ClientFailure, ClientUpdate


class Clients(Protocol):
    """What the round loop (federation/inprocess.py) needs from its clients, whatever the transport.

    ``fit`` returns the updates of the clients that answered (decoded, not yet validated: the
    loop validates) and a failure per client that did not, with the reason; it decides nothing
    about the round. ``rollback(round)`` forgets client state written in ``round`` or later."""

    def __len__(self) -> int: ...

    def sizes(self) -> list[int]: ...

    def steps(self, client: int, round: int) -> int: ...

    def fit(
        self, round: int, clients: Sequence[int], global_adapter: Adapter, client_config: dict, lr: float
    ) -> tuple[list[ClientUpdate], list[ClientFailure]]: ...

    def evaluate(self, round: int, clients: Sequence[int], adapter: Adapter) -> tuple[dict[int, dict], list[ClientFailure]]: ...

    def rollback(self, round: int) -> None: ...


class LocalClients:
    """All clients of a simulation: their data, and the one trainer that serves them.

    ``dropout``: probability that a sampled client fails to return its update, drawn from
    (seed, "failures", round, client), so a resumed run fails the same clients.
    ``local_steps``: optimizer steps per round for each client (None: the trainer's own).
    ``state``: where clients keep state between rounds (needed by SCAFFOLD and error feedback).
    ``ranks``: each client's LoRA rank (None: all train the full rank).
    ``compression``: how clients encode their deltas for the upload.
    ``round_steps`` (round -> optimizer steps) fixes every fit's step budget instead; the
    centralized baseline uses it (federation/baselines.py).
    ``client_side``: what a client does to its update before sending it (simulated attacks,
    local DP; federation/attacks.py).
    ``holdout``: the clients' own held-out rows, for federated evaluation (``evaluate``).
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
        ranks: Optional[Sequence[int]] = None,
        compression: Compression = Compression(),
        client_side: Optional[ClientSide] = None,
        holdout: Optional[ClientHoldout] = None,
    ):
        self.trainer, self.data, self.progress = trainer, data, progress
        self.seed, self.dropout, self.local_steps, self.state = seed, dropout, local_steps, state
        self.round_steps = round_steps or {}
        self.ranks, self.compression = ranks, compression
        self.client_side = client_side
        self.pipeline = ClientPipeline(trainer, client_side, compression, state)
        self.holdout = holdout  # eval.federated: every client's own held-out rows (client_eval.py)

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
                failures.append(ClientFailure(cid, f"simulated dropout (federation.dropout={self.dropout})", simulated=True))
                continue
            rank = None if self.ranks is None else self.ranks[cid]
            self.progress.client_started(round, cid, self.steps(cid, round))
            upload = self.pipeline.fit(cid, self.data[cid], global_adapter, round=round, lr=lr, client_config=client_config,
                                       local_steps=self._local_steps(cid, round), rank=rank, on_step=self.progress.step)
            update = upload.update
            if self.compression.method != "none":  # the server sees the decoded delta
                update.delta = self.compression.decode(upload.payload, global_adapter)
            self.progress.client_finished(round, cid, update.metrics)
            updates.append(update)
        return updates, failures

    def evaluate(self, round: int, clients: Sequence[int], adapter: Adapter) -> tuple[dict[int, dict], list[ClientFailure]]:
        """Federated evaluation: each of ``clients`` scores ``adapter`` on its own held-out rows;
        returns ({client: sums}, failures) (federation/client_eval.py, evaluation/federated.py)."""
        assert self.holdout is not None, "federated evaluation needs the clients' held-out rows (eval.federated)"
        return self.holdout.evaluate(round, clients, adapter)

    def rollback(self, round: int) -> None:
        """Forget client state written in ``round`` or later (resume, or a skipped round)."""
        if self.state is not None:
            self.state.rollback(round)
