"""One loader for a run directory, a PEFT adapter folder and a merged model folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fedtune.errors import CheckpointError, ConfigError, ModelError
from fedtune.evaluation.evaluate import evaluate_run
from fedtune.federation.loader import ADAPTER, MERGED, RUN, folder_kind, load_any_model
from tests.tolerance import FORWARD, close


def logits(loaded, text="Name a color."):
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits[0]  # (t, V)


def test_a_copied_adapter_folder_is_the_run_s_model(finished_run, tmp_path):
    copy = tmp_path / "shared"
    shutil.copytree(finished_run / "adapter", copy)
    run, adapter = load_any_model(finished_run), load_any_model(copy)

    assert (run.kind, adapter.kind) == (RUN, ADAPTER) and adapter.template == run.template == "chat"
    assert close(logits(adapter), logits(run), FORWARD)
    with adapter.base_only(), run.base_only():
        assert close(logits(adapter), logits(run), FORWARD)


def test_an_adapter_whose_base_is_not_here(finished_run, tmp_path):
    copy = tmp_path / "shared"
    shutil.copytree(finished_run / "adapter", copy)
    (copy / "fedtune.json").unlink()
    config = json.loads((copy / "adapter_config.json").read_text())
    for base, needles in [("nobody-here/no-such-model", ["'nobody-here/no-such-model'", "hf download nobody-here/no-such-model", "HF_HUB_OFFLINE"]),
                          (str(tmp_path / "gone"), [str(tmp_path / "gone"), "not on this machine", "hub id"])]:
        (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
        with pytest.raises(ModelError) as err:
            load_any_model(copy)
        assert "\n" not in str(err.value) and all(n in str(err.value) for n in needles), str(err.value)


def test_a_merged_folder_loads_and_evaluates_but_has_no_base(finished_run, tmp_path):
    from fedtune.model.export import export_model

    merged = export_model(finished_run, tmp_path / "merged").folder
    loaded = load_any_model(merged)
    assert loaded.kind == MERGED and loaded.template == "chat"
    assert close(logits(loaded), logits(load_any_model(finished_run)), FORWARD)
    with pytest.raises(ConfigError, match="merged model"):
        loaded.drop_adapter()
    with pytest.raises(ConfigError, match="pass --data FILE"):
        evaluate_run(merged)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w, "category": "say"}) + "\n" for w in ["yes", "no"]))
    record = evaluate_run(merged, data=str(data), overrides=["eval.max_new_tokens=2"])
    assert record["heldout"]["loss"] > 0 and (merged / "evaluations" / "rows.json").is_file()


def test_folder_kind_refuses_other_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        folder_kind(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not a fedtune run directory .* a PEFT adapter folder .* or a model folder"):
        folder_kind(tmp_path)
