"""A SuperNode's client state on its own disk, and the server's rollbacks reaching it."""

import torch

from fedtune.config import load_config
from fedtune.federation.flower.node_state import DEFAULT_STATE_DIR, STATE_DIR, apply_rollbacks, node_store, run_key


def version(store, client, round):
    stored = store.load(client, round)
    return None if stored is None else int(stored["v"].item())


def test_the_store_is_keyed_by_run_and_config_and_found_again_on_resume(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=2"])
    longer = load_config(None, tiny_overrides + ["federation.rounds=5"])  # a resume may add rounds
    other = load_config(None, tiny_overrides + ["seed=9"])

    store = node_store(cfg, {STATE_DIR: str(tmp_path)})

    assert store.root == tmp_path / run_key(cfg) and run_key(longer) == run_key(cfg) != run_key(other)
    assert node_store(cfg, {}, "/sim").root.parent.as_posix() == "/sim"
    assert node_store(cfg, {}).root.parent == DEFAULT_STATE_DIR.expanduser()


def test_rollbacks_drop_stale_versions_once_per_session(tiny_config, tmp_path):
    store = node_store(tiny_config, {STATE_DIR: str(tmp_path)})
    for r in (1, 2, 3):
        store.save(0, r, {"v": torch.tensor(r)})
    # the run resumes from checkpoint 1 (rollback 2); client 0 is not sampled in round 2, only in 3
    apply_rollbacks(store, 0, "s1", [2])
    assert version(store, 0, 3) == 1  # not the interrupted run's round-2 (or 3) version
    store.save(0, 3, {"v": torch.tensor(30)})
    apply_rollbacks(store, 0, "s1", [2])  # the same rollback again, with the next message: nothing to drop
    assert version(store, 0, 4) == 30
    apply_rollbacks(store, 0, "s1", [2, 5])  # a later skipped round 5 in the same session
    assert version(store, 0, 6) == 30
    apply_rollbacks(store, 0, "s2", [1])  # a new run in the same folder: nothing of the old one survives
    assert version(store, 0, 6) is None


def test_a_nodes_rollback_drops_only_its_own_clients_versions(tiny_config, tmp_path):
    """Nodes sharing a state-dir train at once: client 1's node, applying the session's
    rollback after client 0's node already wrote its fresh round-1 version, must not drop it
    (and each node's marker is its own: no shared temporary file to race on)."""
    store = node_store(tiny_config, {STATE_DIR: str(tmp_path)})
    apply_rollbacks(store, 0, "s1", [1])
    store.save(0, 1, {"v": torch.tensor(10)})

    apply_rollbacks(store, 1, "s1", [1])

    assert version(store, 0, 2) == 10
    assert sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("rollbacks.json")) == [
        "client_00000/rollbacks.json", "client_00001/rollbacks.json"]
