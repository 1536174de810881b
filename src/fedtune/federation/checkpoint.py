"""Round checkpoints: written atomically, verified by content hash on load.

Layout (names are constants)::

    run_dir/checkpoints/LATEST                  text: the newest complete checkpoint's folder name
    run_dir/checkpoints/round_00003/
        adapter_model.safetensors, adapter_config.json   global adapter (PEFT format)
        strategy_state.safetensors                       strategy state tensors
        state.json                                       round, metrics lines, config hash, file hashes

Per-client state that lives across rounds (SCAFFOLD's client control variates) is not copied
into each checkpoint: it sits in ``run_dir/client_state/``, versioned by round, and resuming
from round k drops the versions written after k (federation/client_state.py).

A checkpoint is written into a temporary folder, flushed to disk, then renamed into place,
and only then does LATEST move to it: a crash at any moment leaves the previous checkpoint
intact and LATEST pointing at a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedtune import __version__
from fedtune.errors import CheckpointError
from fedtune.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from fedtune.types import Adapter

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
STATE_FILE = "state.json"
STRATEGY_FILE = "strategy_state.safetensors"
PREFIX = "round_"

ROUND_KEY = "round"
METRICS_KEY = "metrics_lines"
CONFIG_HASH_KEY = "config_hash"
FILES_KEY = "files"
RNG_KEY = "rng"
EXTRA_KEY = "extra"


@dataclass
class Checkpoint:
    round: int
    adapter: Adapter
    strategy_state: dict[str, torch.Tensor]
    metrics_lines: int
    config_hash: str
    extra: dict = field(default_factory=dict)  # JSON-able engine state (e.g. per-client bookkeeping)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def save_checkpoint(run_dir: Path, ckpt: Checkpoint, peft_config, seed: int, keep: int = 2) -> Path:
    """Write ``ckpt`` atomically and keep only the ``keep`` newest checkpoints."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_dir(run_dir, ckpt.round).name
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(tmp, ckpt.adapter, peft_config)
    save_file({k: v.contiguous() for k, v in ckpt.strategy_state.items()}, str(tmp / STRATEGY_FILE))
    files = {f: _sha256(tmp / f) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, STRATEGY_FILE)}
    state = {
        ROUND_KEY: ckpt.round,
        METRICS_KEY: ckpt.metrics_lines,
        CONFIG_HASH_KEY: ckpt.config_hash,
        RNG_KEY: {"seed": seed, "scheme": "numpy SeedSequence([seed, stream, round, client]); no state carried"},
        EXTRA_KEY: ckpt.extra,
        FILES_KEY: files,
        "fedtune_version": __version__,
    }
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    for f in (*files, STATE_FILE):
        _fsync(tmp / f)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(name)
    _fsync(latest_tmp)
    os.replace(latest_tmp, root / LATEST)
    for old in sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir(run_dir: Path, round: int) -> Path:
    """The folder of round ``round``'s checkpoint."""
    return run_dir / CHECKPOINTS / f"{PREFIX}{round:05d}"


def kept_rounds(run_dir: Path) -> list[int]:
    """Rounds whose checkpoint folder is on disk (complete or not), ascending."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(p.name[len(PREFIX):]) for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit())


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint (the one LATEST names)."""
    root = run_dir / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        if kept_rounds(run_dir):
            raise CheckpointError(f"{pointer} is missing (the run directory was edited by hand)")
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from; start it again with output.overwrite=true")
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing (the run directory was edited by hand)")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify a checkpoint folder; any mismatch raises CheckpointError."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        files = state[FILES_KEY]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path}: {STATE_FILE} is missing or corrupt") from None
    for name, digest in files.items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise CheckpointError(
                f"{path}: {name} is missing or does not match its recorded hash (corrupt or truncated); restore it"
            )
    adapter, _ = load_adapter(path)
    try:
        strategy_state = load_file(str(path / STRATEGY_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: {STRATEGY_FILE} is unreadable ({err})") from None
    return Checkpoint(
        round=int(state[ROUND_KEY]),
        adapter=adapter,
        strategy_state=strategy_state,
        metrics_lines=int(state[METRICS_KEY]),
        config_hash=str(state[CONFIG_HASH_KEY]),
        extra=dict(state.get(EXTRA_KEY) or {}),
    )
