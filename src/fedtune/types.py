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
