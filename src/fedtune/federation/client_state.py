"""Per-client state that persists across rounds (SCAFFOLD's client control variates), on
disk under the run directory, one client at a time in memory, versioned by round:

    run_dir/client_state/client_00007/round_00003.safetensors    client 7's state after round 3

A client fitting in round r reads its newest version written before r. Versions make the
store agree with the checkpoints (federation/checkpoint.py): resuming from the checkpoint of
round k first drops every version written after k (:meth:`ClientStateStore.rollback`), as
does a round the server skipped, so the clients are exactly where they were at round k.
Old versions are pruned as new ones are written, keeping what each of the ``keep`` newest
checkpoints needs (at most keep + 1 files per client).

Files are written to a temporary name and renamed into place, so a crash leaves either the
old or the new version, never a torn one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedtune.errors import CheckpointError

CLIENT_STATE = "client_state"
_VERSION = re.compile(r"round_(\d{5,})\.safetensors")


class ClientStateStore:
    """Round-versioned tensors per client under ``root``."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def _dir(self, client: int) -> Path:
        return self.root / f"client_{client:05d}"

    def _versions(self, folder: Path) -> list[int]:
        """Rounds with a stored version in ``folder``, ascending."""
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION.fullmatch(p.name)))

    def load(self, client: int, round: int) -> Optional[dict[str, torch.Tensor]]:
        """The client's newest state written before ``round`` (None: it has none yet)."""
        folder = self._dir(client)
        earlier = [v for v in self._versions(folder) if v < round]
        if not earlier:
            return None
        path = folder / f"round_{earlier[-1]:05d}.safetensors"
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: client state is unreadable ({err}); delete the file to restart that client from zero") from None

    def save(self, client: int, round: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store the client's state as of ``round``, then prune versions no kept checkpoint
        needs: a checkpoint of round k needs the newest version <= k, and the oldest kept
        checkpoint is at least round - keep."""
        folder = self._dir(client)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"round_{round:05d}.safetensors"
        tmp = folder / f".{final.name}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, final)
        older = [v for v in self._versions(folder) if v <= round - self.keep]
        for v in older[:-1]:
            (folder / f"round_{v:05d}.safetensors").unlink(missing_ok=True)

    def rollback(self, round: int, client: Optional[int] = None) -> None:
        """Forget every version written in ``round`` or later (resume after round - 1, or a
        skipped round), of every client or of ``client`` only."""
        if not self.root.is_dir():
            return
        folders = self.root.iterdir() if client is None else [self._dir(client)]
        for folder in folders:
            for v in self._versions(folder):
                if v >= round:
                    (folder / f"round_{v:05d}.safetensors").unlink()
