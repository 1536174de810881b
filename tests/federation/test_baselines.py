import json

import pytest
import torch

from fedtune.client.sft import LocalTrainer
from fedtune.config import load_config
from fedtune.data.prompts import Encoded
from fedtune.errors import ConfigError
from fedtune.federation import baselines
from fedtune.federation.clients import LocalClients
from fedtune.federation.inprocess import run
from fedtune.reporting.metrics import read_metrics
from fedtune.reporting.progress import Progress


def shard(n):
    return [Encoded(torch.arange(5, dtype=torch.long), 2) for _ in range(n)]


def test_centralized_budget_is_the_federated_schedules_steps_per_round():
    # Arrange: batch 2, one epoch per round: clients of 4, 6 and 3 examples take 2, 3 and 2 steps
    trainer = LocalTrainer(None, {"w": torch.nn.Parameter(torch.zeros(1))}, pad_id=0, batch_size=2, local_epochs=1)
    clients = LocalClients(trainer, [shard(4), shard(6), shard(3)], Progress())
    schedule = {1: [0, 1], 2: [1, 2], 3: [0, 1, 2]}.get

    # Act
    pooled = baselines.pooled_clients(schedule, clients, rounds=3)

    # Assert: B_1 = 2 + 3, B_2 = 3 + 2, B_3 = 2 + 3 + 2; one client holding all 13 examples
    assert pooled.round_steps == {1: 5, 2: 5, 3: 7}
    assert len(pooled) == 1 and pooled.sizes() == [13]
    assert [pooled.steps(0, r) for r in (1, 2, 3)] == [5, 5, 7]


def test_local_client_ids_are_listed_or_drawn_from_the_seed():
    cfg = load_config(None, ["partition.num_clients=10", "local.count=3"])
    drawn = baselines.local_client_ids(cfg)
    assert len(drawn) == 3 and len(set(drawn)) == 3 and all(0 <= c < 10 for c in drawn)
    assert baselines.local_client_ids(cfg) == drawn  # same seed, same clients
    assert baselines.local_client_ids(load_config(None, ["local.clients=[7, 2]"])) == [7, 2]


def test_with_mode_resets_what_does_not_apply(tmp_path):
    cfg = load_config(None, ["local.clients=[1, 2]", "compare.reuse=false"])
    fed = baselines.with_mode(cfg, "federated", tmp_path / "f")
    assert fed.federation.mode == "federated" and fed.local.clients == [] and fed.compare.reuse
    assert fed.output.dir == str(tmp_path / "f")
    local = baselines.local_configs(cfg, tmp_path)
    assert [(c.local.clients, c.output.dir) for c in local] == [([1], str(tmp_path / "local-1")), ([2], str(tmp_path / "local-2"))]


def test_a_local_run_holds_one_client(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["federation.mode=local", "local.clients=[0, 1]"])
    with pytest.raises(ConfigError, match=r"one run trains one client, got local.clients=\[0, 1\]"):
        run(cfg)


def test_bad_local_clients_are_config_errors():
    with pytest.raises(ConfigError, match=r"local.clients: \[4\] not in 0..3"):
        load_config(None, ["partition.num_clients=4", "local.clients=[4]"])


def fits(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "fit"]


def test_centralized_run_matches_the_federated_budget_on_the_same_partition(tiny_overrides, tmp_path):
    # Arrange
    common = tiny_overrides + ["federation.rounds=2"]
    fed = run(load_config(None, common + [f"output.dir={tmp_path / 'fed'}"]))

    # Act
    cen = run(load_config(None, common + ["federation.mode=centralized", f"output.dir={tmp_path / 'cen'}"]))

    # Assert: 2 clients x 3 steps per round federated; the pooled client takes 6 per round
    fed_fits, cen_fits = fits(fed.run_dir), fits(cen.run_dir)
    assert [f["steps"] for f in fed_fits] == [3, 3, 3, 3]
    assert [(f["round"], f["client"], f["steps"]) for f in cen_fits] == [(1, 0, 6), (2, 0, 6)]
    part = json.loads((fed.run_dir / "partition.json").read_text())
    assert json.loads((cen.run_dir / "partition.json").read_text()) == part
    assert cen_fits[0]["examples"] == sum(len(ids) for ids in part["clients"].values())
    assert cen.final_eval["examples"] == fed.final_eval["examples"] == len(part["holdout"])
