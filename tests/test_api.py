"""The Python API (`from fedtune import load_config, run, evaluate, compare, export`)."""

import pytest

import fedtune
from fedtune.config import to_dict
from fedtune.errors import ConfigError


def test_load_config_takes_names_files_configs_and_either_kind_of_overrides(tiny_overrides, tmp_path):
    from_list = fedtune.load_config("demo", ["lora.r=4", "train.lr=1e-3", "~partition.method"])
    from_map = fedtune.load_config("demo", {"lora.r": 4, "train.lr": 1e-3, "output.dir": tmp_path / "a: b"})
    assert (from_list.lora.r, from_list.train.lr, from_list.partition.method) == (4, 1e-3, "iid")
    assert (from_map.lora.r, from_map.train.lr, from_map.output.dir) == (4, 1e-3, str(tmp_path / "a: b"))
    again = fedtune.load_config(from_list, {"federation.rounds": 9})  # a RunConfig with overrides on top
    assert again.federation.rounds == 9 and to_dict(again)["lora"] == to_dict(from_list)["lora"]
    with pytest.raises(ConfigError, match="lora.r: must be > 0"):
        fedtune.load_config(None, {"lora.r": 0})


def test_a_tiny_federation_runs_resumes_and_evaluates_through_the_api(tiny_overrides):
    # Arrange
    cfg = fedtune.load_config(None, tiny_overrides + ["federation.rounds=1"])

    # Act
    result = fedtune.run(cfg)
    resumed = fedtune.run(resume=result.run_dir, overrides={"federation.rounds": 2})
    record = fedtune.evaluate(result.run_dir, overrides={"eval.generation_examples": 2})

    # Assert
    assert result.finished and result.rounds_done == 1 and (result.run_dir / "adapter" / "adapter_config.json").is_file()
    assert resumed.finished and resumed.rounds_done == 2 and resumed.run_dir == result.run_dir
    assert record["name"] == "heldout" and (result.run_dir / "evaluations" / "heldout.json").is_file()
    assert record["heldout"]["loss"] > 0 and set(record["heldout"]["per_category"]) and len(record["samples"]) == 2
    with pytest.raises(ConfigError, match="--from-round N needs --resume"):
        fedtune.run(cfg, from_round=1)


def test_compare_through_the_api(tiny_overrides, tmp_path):
    cfg = fedtune.load_config(None, tiny_overrides)
    overrides = {"federation.rounds": 1, "compare.models": ["base", "federated"], "eval.generation_examples": 2,
                 "output.dir": tmp_path / "cmp"}
    result = fedtune.compare(cfg, overrides)
    assert result.comparison["models"] == ["base", "federated"]
    assert (result.folder / "comparison.json").is_file()


def test_export_through_the_api(finished_run, tmp_path):
    result = fedtune.export(finished_run, tmp_path / "merged", dtype="bfloat16")
    assert result.folder == tmp_path / "merged" and (result.folder / "config.json").is_file()
    assert any(f.endswith(".safetensors") for f in result.files)


def test_the_api_is_listed_and_unknown_names_fail():
    assert {"load_config", "run", "evaluate", "compare", "export"} <= set(dir(fedtune)) and fedtune.__version__
    with pytest.raises(AttributeError, match="no attribute 'train'"):
        fedtune.train  # noqa: B018
