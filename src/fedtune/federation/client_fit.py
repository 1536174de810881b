"""One client's fit, end to end: the client pipeline both engines run.

The in-process engine (federation/clients.py, ``LocalClients``) calls it for every sampled
client; a Flower SuperNode (federation/flower/client_app.py, ``answer_train``) calls it for
the one client it holds, between decoding the TRAIN message and encoding the reply. In order:

1. load the client's kept state (:class:`ClientStateStore`, newest version before the round):
   its SCAFFOLD variate c_i (zeros before its first fit) and error-feedback residual e_i;
2. ``trainer.fit`` at the client's LoRA rank (HetLoRA rank view; None: the full rank) and
   step budget;
3. ``client_side.outgoing``: a simulated attack, or local DP noise (federation/attacks.py);
4. compression of the delta with the residual (federation/compression.py): the payload that
   crosses the wire, ``upload_bytes`` in the metrics, and the new residual e_i';
5. the control-variate update c_i^+ = c_i + Delta c_i (SCAFFOLD; the attack and local DP
   change the delta only, so this is the client's own variate);
6. save {c_i^+, e_i'} as the client's state of this round.

The fit metrics are the same on both engines: the trainer's (loss, steps, tokens, seconds,
...), ``rank`` when ranks differ per client, ``malicious`` for an attacker, ``upload_bytes``,
``upload_bytes_fp32`` and ``setup_seconds`` (what the engine spent getting the model and data
ready for this fit; 0 in-process, where everything is loaded once before round 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from fedtune.errors import CheckpointError
from fedtune.federation.attacks import ClientSide
from fedtune.federation.client_state import ClientStateStore
from fedtune.federation.compression import Compression, encode_upload
from fedtune.types import SERVER_CONTROL, Adapter, ClientUpdate

CONTROL, RESIDUAL = "control", "residual"  # the parts of a client's kept state
_SEP = "/"


@dataclass
class Upload:
    """What a fit sends: ``update`` (its delta uncompressed, as the client computed it) and
    ``payload``, the delta as encoded for the wire (``update.delta`` itself without compression)."""

    update: ClientUpdate
    payload: Adapter


@dataclass
class ClientPipeline:
    """The client side of a round for one client at a time (see the module docstring)."""

    trainer: object  # LocalTrainer or PreferenceTrainer
    client_side: Optional[ClientSide] = None
    compression: Compression = Compression()
    state: Optional[ClientStateStore] = None

    def fit(
        self, client: int, examples: Sequence, global_adapter: Adapter, *, round: int, lr: float, client_config: dict,
        local_steps: Optional[int] = None, rank: Optional[int] = None, setup_seconds: float = 0.0,
        on_step: Optional[Callable] = None,
    ) -> Upload:
        kept = self.load_state(client, round, global_adapter)
        control = self.control(kept.get(CONTROL), client_config)
        update = self.trainer.fit(client, examples, global_adapter, round=round, lr=lr, client_config=client_config,
                                  client_control=control, local_steps=local_steps, rank=rank, on_step=on_step)
        update.rank = rank
        if rank is not None:
            update.metrics["rank"] = rank
        if self.client_side is not None:  # a simulated attack, or local DP noise, before the upload
            update = self.client_side.outgoing(update, round)
        payload, residual = encode_upload(update, self.compression, kept.get(RESIDUAL))
        update.metrics["setup_seconds"] = setup_seconds
        new_state = {} if residual is None else {RESIDUAL: residual}
        if update.control_delta is not None:  # the client keeps c_i^+ = c_i + Delta c_i
            new_state[CONTROL] = {k: control[k] + update.control_delta[k] for k in control}
        if new_state:
            assert self.state is not None, "SCAFFOLD and error feedback need a ClientStateStore"
            self.state.save(client, round, flatten(new_state))
        return Upload(update, payload)

    def load_state(self, client: int, round: int, like: Adapter) -> dict[str, Adapter]:
        """What the client kept from its previous fit: {CONTROL: c_i, RESIDUAL: e_i} (parts may be missing)."""
        stored = None if self.state is None else self.state.load(client, round)
        if stored is None:
            return {}
        parts = unflatten(stored)
        for name, tensors in parts.items():
            if tensors.keys() != like.keys() or any(tensors[k].shape != v.shape for k, v in like.items()):
                raise CheckpointError(
                    f"{self.state.root}: client {client}'s stored {name} does not fit this adapter; start a new run"
                )
        return parts

    def control(self, stored: Optional[Adapter], client_config: dict) -> Optional[Adapter]:
        """The client's SCAFFOLD variate c_i (zeros before its first round), or None."""
        server_control = client_config.get(SERVER_CONTROL)
        if server_control is None:
            return None
        assert self.state is not None, "SCAFFOLD clients need a ClientStateStore"
        return stored if stored is not None else {k: torch.zeros_like(v) for k, v in server_control.items()}


def flatten(parts: dict[str, Adapter]) -> dict[str, torch.Tensor]:
    return {f"{name}{_SEP}{k}": v for name, tensors in parts.items() for k, v in tensors.items()}


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Adapter]:
    parts: dict[str, Adapter] = {}
    for key, v in flat.items():
        name, _, k = key.partition(_SEP)
        parts.setdefault(name, {})[k] = v
    return parts
