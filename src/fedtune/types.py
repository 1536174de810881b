"""The few types that cross module boundaries (see DESIGN.md, "Core types")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

# LoRA tensors by canonical PEFT key (no adapter name), CPU, float32, contiguous.
Adapter = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What a client sends back after local training."""

    client_id: int
    num_examples: int  # training examples in the client's shard (the FedAvg weight)
    delta: Adapter  # local adapter - global adapter
    metrics: dict[str, float] = field(default_factory=dict)  # loss, steps, tokens, seconds ...
    control_delta: Optional[Adapter] = None  # SCAFFOLD: change of the client's control variate
    rank: Optional[int] = None  # HetLoRA: the LoRA rank the client trained (None: the full rank)


@dataclass
class ClientFailure:
    """A sampled client that did not return an update this round."""

    client_id: int
    reason: str  # e.g. "simulated dropout (federation.dropout=0.2)"
    simulated: bool = False  # a seeded, simulated failure (a rerun fails the same way), not a real one


# Keys of the ``client_config`` dict a strategy sends its clients each round (empty for FedAvg).
PROX_MU = "prox_mu"  # FedProx: float mu of the proximal term mu/2 ||w - w_global||^2
SERVER_CONTROL = "server_control"  # SCAFFOLD: Adapter, the server control variate c
