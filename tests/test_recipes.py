import pytest

from fedtune.bundled_recipes import RECIPES_DIR
from fedtune.config import load_config

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_a_valid_config(path):
    load_config(path)


def test_demo_recipe_meets_the_demo_promise():
    cfg = load_config(RECIPES[0].parent / "demo.yaml")
    assert cfg.partition.num_clients >= 10 and cfg.federation.rounds >= 3
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.data.path == "demo"


def test_dpo_recipes_are_dpo_runs():
    demo = load_config(RECIPES[0].parent / "dpo-demo.yaml")
    after = load_config(RECIPES[0].parent / "dpo-after-sft.yaml")
    sft = load_config(RECIPES[0].parent / "demo.yaml")
    assert demo.task == after.task == "dpo" and demo.data.path == "demo"
    assert after.model.init_adapter == sft.output.dir and after.dpo.reference == "initial"
    assert (after.model.name, after.lora) == (sft.model.name, sft.lora)  # the SFT adapter fits


def test_demo_compare_recipe_compares_all_four_on_a_non_iid_split():
    cfg = load_config(RECIPES[0].parent / "demo-compare.yaml")
    assert cfg.compare.models == ["base", "local", "federated", "centralized"]
    assert cfg.partition.method == "shards" and cfg.model.name == "smollm2-135m-instruct" and cfg.data.path == "demo"
    assert cfg.federation.mode == "federated" and cfg.local.count >= 2


def test_alpaca_compare_recipe_splits_alpaca_by_instruction_verb():
    cfg = load_config(RECIPES[0].parent / "alpaca-compare.yaml")
    assert cfg.compare.models == ["base", "local", "federated", "centralized"] and cfg.local.count >= 2
    assert cfg.task == "sft" and cfg.data.template == "alpaca" and cfg.data.instruction_categories
    assert cfg.partition.method == "shards"  # non-IID over the derived categories


def test_hh_rlhf_recipe_holds_out_enough_pairs_for_a_stable_accuracy():
    cfg = load_config(RECIPES[0].parent / "hh-rlhf-dpo.yaml")
    assert cfg.task == "dpo" and cfg.partition.holdout_per_category >= 100
