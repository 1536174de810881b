"""`fedtune config`: the settings tree as commented YAML."""

import pytest
import yaml

from fedtune.config import load_config, to_dict
from fedtune.config_doc import render, sections
from fedtune.errors import ConfigError


def test_the_tree_is_a_valid_config_of_the_same_values():
    cfg = load_config("demo", ["lora.r=16", "federation.rounds=2"])
    text = render(cfg)
    assert yaml.safe_load(text) == to_dict(cfg)
    assert yaml.safe_load(render(load_config(None))) == to_dict(load_config(None))


def test_every_setting_has_its_help_and_non_defaults_name_the_default():
    text = render(load_config("demo", ["lora.r=16"]))
    assert "  # LoRA rank; > 0; default: 8\n  r: 16\n" in text
    assert "# how rows are split across clients; one of: iid, shards, dirichlet; default: iid\n  method: shards" in text
    assert "# LoRA scaling numerator (scale = alpha / r); > 0\n  alpha: 16.0\n" in text  # the default: no note
    assert "< 2**63" in text  # big bounds stay readable
    assert all(len(line) <= 100 for line in text.splitlines() if line.lstrip().startswith("#"))


def test_a_section_alone():
    cfg = load_config(None, ["data.columns.output=response"])
    text = render(cfg, "data.columns")
    assert text.startswith("data:\n  columns:\n")
    assert yaml.safe_load(text) == {"data": {"columns": to_dict(cfg)["data"]["columns"]}}
    assert "lora" in sections() and "eval.judge" in sections()


def test_an_unknown_section_names_the_nearest():
    with pytest.raises(ConfigError, match=r"no config section 'lorra' \(did you mean 'lora'\?\); the sections are: model, lora"):
        render(load_config(None), "lorra")
