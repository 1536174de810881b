"""Federated evaluation in the in-process engine (federation/client_eval.py)."""

import dataclasses
import json

import pytest

from fedtune.config import load_config
from fedtune.data.partition import client_holdout
from fedtune.federation import setup
from fedtune.federation.client_eval import split_rows
from fedtune.federation.inprocess import run
from fedtune.model.lora import load_adapter, set_adapter
from fedtune.seeding import generator
from tests.run_records import records
from tests.tolerance import FORWARD, numbers_close

ON = ["eval.federated=true", "eval.client_holdout=0.25", "federation.rounds=2"]


def test_split_rows_is_a_seeded_function_of_seed_and_client(tiny_config):
    cfg = dataclasses.replace(tiny_config, eval=dataclasses.replace(tiny_config.eval, client_holdout=0.25))
    rows = list(range(100, 120))
    train, held = split_rows(cfg, 3, rows)
    assert len(held) == 5 and sorted(train + held) == rows and not set(train) & set(held)
    assert split_rows(cfg, 3, rows) == (train, held)  # deterministic
    assert split_rows(cfg, 2, rows)[1] != held  # each client draws its own
    assert [rows[i] for i in client_holdout(20, 0.25, generator(cfg.seed, "client-holdout", 3))[1]] == held


@pytest.mark.parametrize("n, fraction, k", [(0, 0.1, 0), (1, 0.5, 0), (2, 0.01, 1), (3, 0.9, 2), (10, 0.1, 1), (10, 0.26, 3)])
def test_client_holdout_sizes(n, fraction, k):
    train, held = client_holdout(n, fraction, generator(0, "client-holdout", 0))
    assert len(held) == k and sorted(train + held) == list(range(n))


def test_inprocess_federated_eval_logs_the_token_weighted_loss_of_the_clients_rows(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ON)
    result = run(cfg)
    d = result.run_dir
    part = json.loads((d / "partition.json").read_text())
    held = {int(c): ids for c, ids in part["client_holdout"].items()}
    assert all(held.values()) and all(not set(ids) & set(part["clients"][str(c)]) for c, ids in held.items())
    lines = records(d, "federated_eval")
    assert [r["round"] for r in lines] == [0, 1, 2] and all(r["clients"] == [0, 1, 2, 3] and r["failed"] == [] for r in lines)
    # Evaluate each client's held-out rows directly with the central evaluator, with the final adapter.
    examples, _, partition = setup.load_and_split(cfg)
    bundle = setup.build_model(cfg)
    encoded = setup.encode_examples(bundle.tokenizer, examples, cfg.data.template, cfg.data.max_length)
    adapter, _ = load_adapter(d / "adapter")
    set_adapter(bundle.params, adapter)
    nll = tokens = n = 0
    for c in range(4):
        rows = [encoded[i] for i in held[c]]
        got = setup.build_evaluator(cfg, bundle, rows, [examples[i].category for i in held[c]]).evaluate(bundle.model)
        nll, tokens, n = nll + got["loss"] * got["tokens"], tokens + got["tokens"], n + got["examples"]
        assert numbers_close(lines[-1]["per_client"][str(c)]["loss"], got["loss"], FORWARD)
    assert lines[-1]["examples"] == n == sum(len(v) for v in held.values()) and lines[-1]["tokens"] == tokens
    assert numbers_close(lines[-1]["loss"], nll / tokens, FORWARD)
    # ... and all held-out rows at once (the union): the same number
    union = [i for c in range(4) for i in held[c]]
    pooled = setup.build_evaluator(cfg, bundle, [encoded[i] for i in union], [examples[i].category for i in union]).evaluate(bundle.model)
    assert numbers_close(lines[-1]["loss"], pooled["loss"], FORWARD)
    assert {c: v["examples"] for c, v in pooled["per_category"].items()} == {c: v["examples"] for c, v in lines[-1]["per_category"].items()}
    assert all(numbers_close(lines[-1]["per_category"][c]["loss"], v["loss"], FORWARD) for c, v in pooled["per_category"].items())
    assert lines[-1]["loss"] < lines[0]["loss"]
