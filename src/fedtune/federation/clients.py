"""How the server reaches its clients. In-process: every client fit runs here, one after
another, on the one shared model. (A distributed engine sends the same requests over the
network and gets the same ClientUpdates back; the round loop does not change.)

This is also where the in-process engine simulates what real clients do: fail to answer
(``dropout``), differ in how much work they do per round (``local_steps``), and keep their
own state across rounds (SCAFFOLD's control variates and error-feedback residuals, in a
:class:`ClientStateStore` on disk), train a lower LoRA rank (``ranks``, HetLoRA), and encode
their upload (``compression``; the fit metrics carry ``upload_bytes``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fedtune.client.sft import LocalTrainer
from fedtune.data.prompts import Encoded
from fedtune.errors import CheckpointError
from fedtune.federation.attacks import ClientSide
from fedtune.federation.client_eval import ClientHoldout
from fedtune.federation.client_state import ClientStateStore
from fedtune.federation.compression import Compression, encode_upload
from fedtune.reporting.progress import Progress
from fedtune.seeding import generator
from fedtune.types import SERVER_CONTROL, Adapter, ClientFailure, ClientUpdate


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
                failures.append(ClientFailure(cid, f"simulated dropout (federation.dropout={self.dropout})"))
                continue
            kept = self._load_state(cid, round, global_adapter)
            control = self._control(kept.get(CONTROL), client_config)
            rank = None if self.ranks is None else self.ranks[cid]
            self.progress.client_started(round, cid, self.steps(cid, round))
            update = self.trainer.fit(
                cid, self.data[cid], global_adapter, round=round, lr=lr, client_config=client_config,
                client_control=control, local_steps=self._local_steps(cid, round), rank=rank, on_step=self.progress.step,
            )
            update.rank = rank
            if self.client_side is not None:  # a simulated attack, or local DP noise, before the upload
                update = self.client_side.outgoing(update, round)
            if rank is not None:
                update.metrics["rank"] = rank
            new_state = self._upload(update, global_adapter, kept.get(RESIDUAL))
            if update.control_delta is not None:  # the client keeps c_i^+ = c_i + Delta c_i
                new_state[CONTROL] = {k: control[k] + update.control_delta[k] for k in control}
            if new_state:
                self.state.save(cid, round, _flatten(new_state))
            self.progress.client_finished(round, cid, update.metrics)
            updates.append(update)
        return updates, failures

    def _upload(self, update: ClientUpdate, global_adapter: Adapter, residual: Optional[Adapter]) -> dict[str, Adapter]:
        """What crosses the wire: the delta encoded by ``compression`` (the server sees the
        decoded delta), and its size in the fit metrics. Returns the state the client keeps
        (its error-feedback residual)."""
        payload, new_residual = encode_upload(update, self.compression, residual)
        if self.compression.method != "none":
            update.delta = self.compression.decode(payload, global_adapter)
        return {} if new_residual is None else {RESIDUAL: new_residual}

    def _load_state(self, client: int, round: int, like: Adapter) -> dict[str, Adapter]:
        """What the client kept from its previous fit: {CONTROL: c_i, RESIDUAL: e_i} (parts may be missing)."""
        if self.state is None:
            return {}
        stored = self.state.load(client, round)
        if stored is None:
            return {}
        parts = _unflatten(stored)
        for name, tensors in parts.items():
            if tensors.keys() != like.keys() or any(tensors[k].shape != v.shape for k, v in like.items()):
                raise CheckpointError(
                    f"{self.state.root}: client {client}'s stored {name} does not fit this adapter; start a new run"
                )
        return parts

    def _control(self, stored: Optional[Adapter], client_config: dict) -> Optional[Adapter]:
        """The client's SCAFFOLD variate c_i (zeros before its first round), or None."""
        server_control = client_config.get(SERVER_CONTROL)
        if server_control is None:
            return None
        assert self.state is not None, "SCAFFOLD clients need a ClientStateStore"
        return stored if stored is not None else {k: torch.zeros_like(v) for k, v in server_control.items()}

    def evaluate(self, round: int, clients: Sequence[int], adapter: Adapter) -> tuple[dict[int, dict], list[ClientFailure]]:
        """Federated evaluation: each of ``clients`` scores ``adapter`` on its own held-out rows;
        returns ({client: sums}, failures) (federation/client_eval.py, evaluation/federated.py)."""
        assert self.holdout is not None, "federated evaluation needs the clients' held-out rows (eval.federated)"
        return self.holdout.evaluate(round, clients, adapter)

    def rollback(self, round: int) -> None:
        """Forget client state written in ``round`` or later (resume, or a skipped round)."""
        if self.state is not None:
            self.state.rollback(round)


CONTROL, RESIDUAL = "control", "residual"  # the parts of a client's kept state
_SEP = "/"


def _flatten(parts: dict[str, Adapter]) -> dict[str, torch.Tensor]:
    return {f"{name}{_SEP}{k}": v for name, tensors in parts.items() for k, v in tensors.items()}


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Adapter]:
    parts: dict[str, Adapter] = {}
    for key, v in flat.items():
        name, _, k = key.partition(_SEP)
        parts.setdefault(name, {})[k] = v
    return parts
