from pathlib import Path

import pytest

from fedtune.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_a_valid_config(path):
    load_config(path)


def test_demo_recipe_meets_the_demo_promise():
    cfg = load_config(RECIPES[0].parent / "demo.yaml")
    assert cfg.partition.num_clients >= 10 and cfg.federation.rounds >= 3
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.data.path == "demo"


def test_demo_compare_recipe_compares_all_four_on_a_non_iid_split():
    cfg = load_config(RECIPES[0].parent / "demo-compare.yaml")
    assert cfg.compare.models == ["base", "local", "federated", "centralized"]
    assert cfg.partition.method == "shards" and cfg.model.name == "smollm2-135m-instruct" and cfg.data.path == "demo"
    assert cfg.federation.mode == "federated" and cfg.local.count >= 2
