import json

import pytest
import torch
from peft import LoraConfig

from fedtune.errors import CheckpointError
from fedtune.federation.checkpoint import (
    CHECKPOINTS,
    LATEST,
    STATE_FILE,
    STRATEGY_FILE,
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedtune.model.lora import ADAPTER_WEIGHTS

ADAPTER = {"base_model.model.l.lora_A.weight": torch.randn(2, 3), "base_model.model.l.lora_B.weight": torch.randn(3, 2)}
PEFT = LoraConfig(r=2, lora_alpha=4, target_modules=["l"])


def ckpt(round_=1):
    return Checkpoint(round_, ADAPTER, {"m/x": torch.ones(3), "t": torch.tensor(4.0)}, metrics_lines=7, config_hash="abc", extra={"k": 1})


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path, ckpt(3), PEFT, seed=0)
    got = load_checkpoint(latest_checkpoint(tmp_path))
    assert got.round == 3 and got.metrics_lines == 7 and got.config_hash == "abc" and got.extra == {"k": 1}
    assert all(torch.equal(got.adapter[k], ADAPTER[k]) for k in ADAPTER)
    assert torch.equal(got.strategy_state["m/x"], torch.ones(3)) and got.strategy_state["t"].item() == 4.0


def test_keeps_newest_and_latest_points_to_newest(tmp_path):
    for r in range(5):
        save_checkpoint(tmp_path, ckpt(r), PEFT, seed=0, keep=2)
    names = sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith("round_"))
    assert names == ["round_00003", "round_00004"]
    assert (tmp_path / CHECKPOINTS / LATEST).read_text() == "round_00004"


def test_crash_mid_write_leaves_previous_checkpoint_usable(tmp_path):
    save_checkpoint(tmp_path, ckpt(1), PEFT, seed=0)
    (tmp_path / CHECKPOINTS / ".tmp-round_00002").mkdir()  # a half-written next checkpoint
    (tmp_path / CHECKPOINTS / ".tmp-round_00002" / ADAPTER_WEIGHTS).write_bytes(b"partial")
    assert load_checkpoint(latest_checkpoint(tmp_path)).round == 1


@pytest.mark.parametrize("victim", [ADAPTER_WEIGHTS, STRATEGY_FILE])
def test_corrupted_or_truncated_file_is_refused(tmp_path, victim):
    path = save_checkpoint(tmp_path, ckpt(2), PEFT, seed=0)
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{victim} is missing or does not match its recorded hash"):
        load_checkpoint(path)


def test_broken_state_file_and_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        latest_checkpoint(tmp_path)
    path = save_checkpoint(tmp_path, ckpt(2), PEFT, seed=0)
    (path / STATE_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json is missing or corrupt"):
        load_checkpoint(path)


def test_state_records_rng_scheme_and_hashes(tmp_path):
    path = save_checkpoint(tmp_path, ckpt(2), PEFT, seed=11)
    state = json.loads((path / STATE_FILE).read_text())
    assert state["rng"]["seed"] == 11
    assert set(state["files"]) == {"adapter_model.safetensors", "adapter_config.json", "strategy_state.safetensors"}
