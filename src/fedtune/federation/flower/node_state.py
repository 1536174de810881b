"""Where a SuperNode keeps its client's state between rounds (SCAFFOLD's c_i, the
error-feedback residual): a :class:`ClientStateStore` on the node's own disk, so it outlives
the Flower run and ``fedtune run --resume`` continues exactly as the in-process engine does.

    <state-dir>/<run key>/client_00003/round_00002.safetensors
    <state-dir>/<run key>/client_00003/rollbacks.json   the server's rollbacks client 3 has applied

``state-dir`` is the ``--node-config`` key of that name (default ``~/.cache/fedtune/node-state``;
the simulation puts it in the run directory). The run key is a hash of the server's
``output.dir`` and the config hash (the settings a resume must keep), so a resumed run finds
its state and another run never reads it.

Rollback: the store must agree with the checkpoint the server continues from. The server
cannot reach a node's disk, so every TRAIN message carries the server's *session* (a token
drawn when the ServerApp starts) and the rounds it rolled back in that session (``rollback(r)``:
forget versions of round r and later; a (re)started run rolls back to its checkpoint + 1, a
skipped round rolls back itself). A node applies the rollbacks it has not applied yet before
it loads anything: it wrote nothing since the server's rollbacks it has not seen (it was not
asked to train), so every version from the smallest of them on is stale, and it drops them.
A client not sampled in round k + 1 of a resumed run but sampled in k + 2 thus never reads
the interrupted run's version of k + 1. Each node applies them to its own client's folder
only: nodes sharing a state-dir (the simulation's virtual nodes, several SuperNodes on one
machine) train at the same time, and one node's rollback must not drop another's fresh version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from fedtune.config import RunConfig, config_hash
from fedtune.federation.client_state import ClientStateStore
from fedtune.federation.rundir import write_atomic

STATE_DIR = "state-dir"  # --node-config key
DEFAULT_STATE_DIR = Path("~/.cache/fedtune/node-state")
ROLLBACKS = "rollbacks.json"


def run_key(cfg: RunConfig) -> str:
    """The folder name of one run's node state: its output.dir and config hash."""
    return hashlib.sha256(f"{cfg.output.dir}\0{config_hash(cfg)}".encode()).hexdigest()[:16]


def node_store(cfg: RunConfig, node_config: dict, state_dir: str | None = None) -> ClientStateStore:
    """This node's store for the run ``cfg``: under ``--node-config state-dir``, else
    ``state_dir`` (the simulation's), else the default."""
    parent = node_config.get(STATE_DIR) or state_dir or DEFAULT_STATE_DIR
    return ClientStateStore(Path(str(parent)).expanduser() / run_key(cfg), keep=cfg.output.keep_checkpoints)


def apply_rollbacks(store: ClientStateStore, client: int, session: str, rounds: Sequence[int]) -> None:
    """Drop every version of ``client`` the server's rollbacks in ``session`` made stale (module doc), once."""
    marker = store.root / f"client_{client:05d}" / ROLLBACKS
    try:
        seen = json.loads(marker.read_text())
    except (OSError, ValueError):
        seen = {}
    applied = set(seen.get("rounds", [])) if isinstance(seen, dict) and seen.get("session") == session else set()
    pending = [r for r in rounds if r not in applied]
    if not pending:
        return
    store.rollback(min(pending), client)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, json.dumps({"session": session, "rounds": sorted(applied | set(pending))}))
