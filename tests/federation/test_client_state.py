import pytest
import torch

from fedtune.errors import CheckpointError
from fedtune.federation.client_state import ClientStateStore


def state(v):
    return {"a": torch.full((2,), float(v)), "b": torch.full((1, 3), -float(v))}


def versions(store, client):
    return sorted(p.name for p in (store.root / f"client_{client:05d}").iterdir())


def test_load_gives_the_newest_version_written_before_the_round(tmp_path):
    store = ClientStateStore(tmp_path, keep=5)
    assert store.load(3, 1) is None
    store.save(3, 1, state(1))
    store.save(3, 4, state(4))
    assert store.load(3, 1) is None  # nothing before round 1
    assert torch.equal(store.load(3, 2)["a"], state(1)["a"])
    assert torch.equal(store.load(3, 4)["b"], state(1)["b"])  # round 4 reads what was written before it
    assert torch.equal(store.load(3, 5)["a"], state(4)["a"])
    assert store.load(7, 5) is None  # clients are independent


def test_rollback_forgets_versions_from_a_round_on(tmp_path):
    store = ClientStateStore(tmp_path, keep=5)
    for r in (1, 2, 3):
        store.save(0, r, state(r))
    store.save(1, 3, state(30))
    store.rollback(3)  # resume after round 2, or round 3 was skipped
    assert versions(store, 0) == ["round_00001.safetensors", "round_00002.safetensors"]
    assert versions(store, 1) == []
    assert torch.equal(store.load(0, 3)["a"], state(2)["a"])
    ClientStateStore(tmp_path / "never-written").rollback(1)  # no folder yet: nothing to do


def test_pruning_keeps_what_the_kept_checkpoints_need(tmp_path):
    store = ClientStateStore(tmp_path, keep=2)
    for r in (1, 2, 4, 7, 8):
        store.save(0, r, state(r))
    # after round 8 the oldest checkpoint kept may be round 6 (keep=2, round 8's not yet written):
    # it needs the newest version <= 6, which is round 4; older ones go
    assert versions(store, 0) == ["round_00004.safetensors", "round_00007.safetensors", "round_00008.safetensors"]
    store.rollback(7)  # resume from checkpoint 6
    assert torch.equal(store.load(0, 7)["a"], state(4)["a"])


def test_a_thousand_clients_one_at_a_time(tmp_path):
    store = ClientStateStore(tmp_path, keep=1)
    for c in range(1000):
        store.save(c, 1, {"a": torch.tensor([float(c)])})
    assert all(store.load(c, 2)["a"].item() == c for c in range(0, 1000, 97))
    assert len(list(tmp_path.iterdir())) == 1000


def test_unreadable_state_names_the_file(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save(2, 1, state(1))
    (tmp_path / "client_00002" / "round_00001.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="client_00002/round_00001.safetensors: client state is unreadable"):
        store.load(2, 2)
