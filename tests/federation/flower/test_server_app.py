import json
import logging

import pytest

from fedtune.config import load_config
from fedtune.errors import DataError
from fedtune.federation import setup
from fedtune.federation.flower.server_app import NODE_DATA, LogProgress, server_data


def test_by_default_the_server_splits_data_path_like_the_in_process_engine(tiny_config):
    examples, _, partition = server_data(tiny_config)
    same_examples, _, same = setup.load_and_split(tiny_config)
    assert examples == same_examples and partition == same


def test_with_node_owned_data_the_server_holds_out_its_own_file(tiny_overrides, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}", "category": "x"}) + "\n" for i in range(7)))
    cfg = load_config(None, tiny_overrides + [f"flower.heldout_path={held}"])

    examples, report, partition = server_data(cfg)

    assert [e.instruction for e in examples] == [f"q{i}" for i in range(7)] and report.source == str(held)
    assert partition.holdout == list(range(7)) and partition.shards == [[]] * 4 and partition.method == NODE_DATA


def test_log_progress_reports_rounds_clients_and_evaluations(caplog):
    with caplog.at_level(logging.INFO, logger="fedtune"):
        p = LogProgress()
        p.round_started(2, [0, 3])
        p.client_finished(2, 3, {"loss": 1.25, "steps": 4, "seconds": 2.0})
        p.evaluated(2, {"loss": 1.0, "ppl": 2.718})
    assert caplog.messages == ["round 2: clients [0, 3]", "round 2 client 3: loss 1.2500, 4 steps, 2.0s",
                               "round 2 held-out: loss 1.0000, perplexity 2.72"]


def test_a_server_without_the_data_is_told_about_heldout_path(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + [f"data.path={tmp_path / 'owners-only.jsonl'}"])
    with pytest.raises(DataError, match="owners-only.jsonl not found; check data.path .*set flower.heldout_path"):
        server_data(cfg)
