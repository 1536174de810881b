"""The Flower engine under `fedtune run`: Flower's simulation runtime (Ray) against the
in-process engine on the same config and seed."""

import pytest

from fedtune.config import load_config
from fedtune.federation.checkpoint import latest_checkpoint, load_checkpoint
from fedtune.federation.flower import simulation
from fedtune.federation.flower.simulation import backend_config
from fedtune.federation.inprocess import run
from fedtune.model.lora import load_adapter
from fedtune.reporting.metrics import read_metrics
from tests.tolerance import FORWARD, TRAINED, adapters_close, numbers_close


def records(run_dir, kind):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == kind]


def test_simulation_ends_with_the_in_process_adapter_and_metrics(tiny_overrides, tmp_path):
    common = tiny_overrides + ["federation.rounds=2", "flower.client_cpus=1", "eval.federated=true", "eval.federated_clients=3"]
    straight = run(load_config(None, common + [f"output.dir={tmp_path / 'inprocess'}"]))
    cfg = load_config(None, common + ["federation.engine=flower", f"output.dir={tmp_path / 'flower'}"])

    flower = simulation.run(cfg)

    assert flower.finished and flower.rounds_done == 2 and load_checkpoint(latest_checkpoint(flower.run_dir)).round == 2
    a, _ = load_adapter(straight.run_dir / "adapter")
    b, _ = load_adapter(flower.run_dir / "adapter")
    assert a.keys() == b.keys() and adapters_close(a, b)
    for kind, fields in (("round", ("round", "clients")), ("fit", ("round", "client", "examples", "steps", "tokens"))):
        assert [[r[f] for f in fields] for r in records(straight.run_dir, kind)] == [[r[f] for f in fields] for r in records(flower.run_dir, kind)]
    losses = lambda d, kind: [r["loss"] for r in records(d, kind)]  # noqa: E731
    assert losses(flower.run_dir, "fit") == pytest.approx(losses(straight.run_dir, "fit"), rel=1e-5)
    assert [r["round"] for r in records(flower.run_dir, "eval")] == [0, 1, 2]
    assert losses(flower.run_dir, "eval") == pytest.approx(losses(straight.run_dir, "eval"), rel=1e-5)
    (nodes,) = records(flower.run_dir, "nodes")
    assert nodes["missing"] == [] and sorted(nodes["clients"]) == ["0", "1", "2", "3"]
    assert (flower.run_dir / "partition.json").read_text() == (straight.run_dir / "partition.json").read_text()
    # federated evaluation (eval.federated): the nodes score each round's adapter on their own held-out rows
    fed_in, fed_fl = records(straight.run_dir, "federated_eval"), records(flower.run_dir, "federated_eval")
    assert [(r["round"], r["clients"], r["examples"], r["tokens"]) for r in fed_fl] == [(r["round"], r["clients"], r["examples"], r["tokens"]) for r in fed_in]
    assert [r["round"] for r in fed_fl] == [0, 1, 2] and all(len(r["clients"]) == 3 and not r["failed"] for r in fed_fl)
    assert all(numbers_close(a["loss"], b["loss"], FORWARD) for a, b in zip(fed_in[:1], fed_fl[:1]))  # round 0: the same adapter
    assert all(numbers_close(a["loss"], b["loss"], TRAINED) for a, b in zip(fed_in, fed_fl))  # later: adapters equal to TRAINED


def test_backend_config_gives_each_client_its_cores_and_gpu_share(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["flower.client_cpus=2", "flower.client_gpus=0.25"])
    assert backend_config(cfg) == {"client_resources": {"num_cpus": 2.0, "num_gpus": 0.25}, "init_args": {"log_to_driver": False}}
