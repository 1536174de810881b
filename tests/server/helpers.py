"""Small builders shared by the server tests."""

import torch

from fedtune.types import ClientUpdate


def update(cid, n, control=None, **tensors):
    """A ClientUpdate from plain lists: update(0, 10, a=[1.0, 2.0])."""
    as_t = lambda d: {k: torch.tensor(v, dtype=torch.float32) for k, v in d.items()}  # noqa: E731
    return ClientUpdate(cid, n, as_t(tensors), control_delta=None if control is None else as_t(control))


def tensors(**values):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}
