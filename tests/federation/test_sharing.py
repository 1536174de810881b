"""A run's final adapter leaves the machine: a base any machine can resolve, fedtune.json with
the local path, the tokenizer and a model card with the held-out figures."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import yaml

from fedtune.config import BUNDLED_MODEL, load_config
from fedtune.federation.sharing import base_identity, figures_table, hub_id_in_cache, write_portable_adapter
from fedtune.model.base import BUNDLED_HUB_ID
from fedtune.reporting.metrics import read_metrics


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_final_adapter_carries_tokenizer_card_and_base(finished_run, tiny_model_dir):
    adapter = finished_run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    record = json.loads((adapter / "fedtune.json").read_text())
    card = (adapter / "README.md").read_text()

    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # a local base with no hub id keeps its path
    assert record["base_model"]["local_path"] == str(tiny_model_dir.resolve()) and record["base_model"]["hub_id"] is None
    assert record["template"] == "chat" and record["kind"] == "adapter"
    assert (adapter / "tokenizer.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and "fedtune" in meta["tags"] and "base_model" not in meta
    evals = [r for r in read_metrics(finished_run / "metrics.jsonl") if r["type"] == "eval"]
    assert f"| loss | {evals[0]['loss']:.4f} | {evals[-1]['loss']:.4f} |" in card
    assert "- rounds: 1\n" in card and "- strategy: fedavg\n" in card and "- fedtune version: 0.1.0" in card


LOAD_OFFLINE = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2])
lora = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
print(json.dumps({"lora_b": lora, "fedtune": "fedtune" in sys.modules}))
"""


def test_bundled_base_is_named_by_hub_id_and_loads_offline(finished_run, tiny_model_dir, tmp_path):
    """As if trained on the bundled model (its local copy: the tiny model): adapter_config names
    the hub id, fedtune.json the local copy and the GGUF variant, and a fresh process with an
    empty Hugging Face cache, offline, loads it on the local base."""
    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run / "adapter", adapter)
    cfg = load_config(finished_run / "config.yaml")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=BUNDLED_MODEL))
    write_portable_adapter(adapter, cfg=cfg, run_dir=finished_run, tokenizer=None, base_path=str(tiny_model_dir))

    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == BUNDLED_HUB_ID
    base = json.loads((adapter / "fedtune.json").read_text())["base_model"]
    assert base["local_path"] == str(tiny_model_dir.resolve()) and "Q4_1.gguf" in base["variant"]
    card = (adapter / "README.md").read_text()
    assert front_matter(card)["base_model"] == BUNDLED_HUB_ID and "dequantised" in card
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    proc = subprocess.run([sys.executable, "-c", LOAD_OFFLINE, base["local_path"], str(adapter)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["lora_b"] > 0 and not loaded["fedtune"]  # the trained adapter, not a fresh one


def test_base_identity_of_hub_names_and_cached_folders(tmp_path):
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-360M" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id_in_cache(snapshot) == "HuggingFaceTB/SmolLM2-360M"
    assert base_identity(str(snapshot), str(snapshot))["hub_id"] == "HuggingFaceTB/SmolLM2-360M"
    assert base_identity("org/model", "org/model") == {"hub_id": "org/model", "local_path": None, "model_name": "org/model", "variant": None}
    assert base_identity(str(tmp_path), str(tmp_path))["hub_id"] is None


def test_figures_table_for_dpo_runs():
    before = {"round": 0, "loss": 0.6931, "reward_accuracy": 0.5, "margin": 0.0, "per_category": {"all": {"loss": 0.6931}}}
    after = {"round": 3, "loss": 0.52, "reward_accuracy": 0.75, "margin": 0.31, "per_category": {"all": {"loss": 0.52}}}
    rows = figures_table(before, after)
    assert "| reward accuracy | 0.5000 | 0.7500 |" in rows and "after (round 3)" in rows[2]
    assert not any("loss: all" in r for r in rows)
    assert figures_table(None, None) == ["No held-out evaluation was recorded."]
