import logging

import pytest

from fedtune.config import load_config
from fedtune.federation.setup import build_strategy


def test_build_strategy_passes_the_configured_hetlora_rule():
    base = ["lora.r=4", "lora.client_ranks=[1, 4]"]
    assert build_strategy(load_config(None, base)).aggregator.hetlora == "sparsity_weighted"
    assert build_strategy(load_config(None, base + ["lora.hetlora_aggregation=slice_mean"])).aggregator.hetlora == "slice_mean"


def test_build_strategy_warns_when_rounds_are_too_small_to_protect(caplog):
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        build_strategy(load_config(None, ["federation.clients_per_round=2", "strategy.aggregator=median"]))
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]
    assert "norm check" in caplog.messages[0] and "median is their mean" in caplog.messages[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        build_strategy(load_config(None, ["federation.clients_per_round=3", "strategy.aggregator=median"]))
    assert caplog.messages == []


def test_a_missing_init_adapter_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """The dpo-after-sft recipe starts from runs/demo: run elsewhere, the error says so."""
    from fedtune.errors import CheckpointError
    from fedtune.federation.setup import read_init_adapter

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=rf"model.init_adapter: runs/demo does not exist \(relative paths start at {tmp_path}\); train"):
        read_init_adapter("runs/demo", {})
