"""Strategy state: a flat ``dict[str, Tensor]`` (scalars as 0-d tensors), so that it is
checkpointed as one safetensors file and resumed exactly (federation/checkpoint.py).

Adapter-shaped state (momenta, second moments, control variates) is stored under a prefix,
``"<prefix>.<adapter key>"``; :func:`pack` and :func:`unpack` convert.
"""

from __future__ import annotations

from typing import Optional

import torch

from fedtune.errors import CheckpointError
from fedtune.types import Adapter

State = dict[str, torch.Tensor]


def pack(prefix: str, adapter: Adapter) -> State:
    """``{"<prefix>.<key>": tensor}`` for every key of ``adapter``."""
    return {f"{prefix}.{k}": v for k, v in adapter.items()}


def unpack(prefix: str, state: State, like: Optional[Adapter] = None) -> Adapter:
    """The adapter stored under ``prefix``; with ``like``, its keys and shapes must match."""
    head = f"{prefix}."
    out = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
    if like is not None and (out.keys() != like.keys() or any(out[k].shape != like[k].shape for k in like)):
        raise CheckpointError(
            f"strategy state has no matching '{prefix}' tensors for this adapter; "
            "it was written by another strategy or LoRA setup, start a new run"
        )
    return out


def filled(adapter: Adapter, value: float) -> Adapter:
    """An adapter of the same keys and shapes with every entry equal to ``value``."""
    return {k: torch.full_like(v, value) for k, v in adapter.items()}
