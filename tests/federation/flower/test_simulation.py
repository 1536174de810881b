"""The Flower engine under `fedtune run`: Flower's simulation runtime (Ray) against the
in-process engine on the same config and seed."""

import pytest
import torch

from fedtune.config import load_config
from fedtune.federation.checkpoint import latest_checkpoint, load_checkpoint
from fedtune.federation.flower import simulation
from fedtune.federation.flower.simulation import backend_config
from fedtune.federation.inprocess import run
from fedtune.model.lora import load_adapter
from tests.run_records import records
from tests.tolerance import FORWARD, TRAINED, adapters_close, numbers_close


def one_thread_run(cfg):
    """The in-process run at the one torch thread each Ray actor trains with (flower.client_cpus=1,
    client_app.NodeCache): the same float sums, so int4 rounding and Adam cannot flip apart."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(cfg)
    finally:
        torch.set_num_threads(threads)


# The same config on both engines, settings combined into few runs (each simulation start costs
# ~10-20 s): every strategy family, a robust aggregator, compression with error feedback,
# HetLoRA ranks, DPO, local DP and an attack. All four clients train every round where client
# state (SCAFFOLD's c_i, residuals) must carry over from round 1 to round 2.
PARITY = {
    "fedavg-federated-eval": ["eval.federated=true", "eval.federated_clients=3"],
    "scaffold-int4-ef-attack": ["strategy.name=scaffold", "compression.method=int4", "compression.error_feedback=true",
                                "attack.fraction=0.25", "attack.kind=sign_flip", "federation.clients_per_round=4"],
    "fedprox-median-localdp": ["strategy.name=fedprox", "strategy.mu=0.1", "strategy.aggregator=median",
                               "privacy.dp=local", "privacy.clip_norm=0.5", "privacy.noise_multiplier=0.5",
                               "federation.clients_per_round=3"],
    "fedadam-hetlora": ["strategy.name=fedadam", "lora.r=4", "lora.client_ranks=[1, 4]", "federation.clients_per_round=4"],
    "dpo": ["task=dpo", "dpo.beta=0.5"],
}


@pytest.mark.parametrize("setting", list(PARITY))
def test_simulation_ends_with_the_in_process_adapter_and_metrics(setting, tiny_overrides, tmp_path):
    common = tiny_overrides + ["federation.rounds=2", "flower.client_cpus=1"] + PARITY[setting]
    straight = one_thread_run(load_config(None, common + [f"output.dir={tmp_path / 'inprocess'}"]))
    cfg = load_config(None, common + ["federation.engine=flower", f"output.dir={tmp_path / 'flower'}"])

    flower = simulation.run(cfg)

    assert flower.finished and flower.rounds_done == 2 and load_checkpoint(latest_checkpoint(flower.run_dir)).round == 2
    a, _ = load_adapter(straight.run_dir / "adapter")
    b, _ = load_adapter(flower.run_dir / "adapter")
    # DPO: a handful of entries whose preference gradient is ~0 take Adam steps of ~lr/2 in opposite
    # directions under the Ray actor's one-thread kernels (measured: 5 of 512 entries of one lora_A,
    # 7.5e-3 of its magnitude, median tensor 3.5e-6) while every fit and eval loss agrees to 1e-6,
    # which the loss checks below hold to 1e-5.
    assert a.keys() == b.keys() and adapters_close(a, b, rel=3e-2 if setting == "dpo" else TRAINED)
    for kind, fields in (("round", ("round", "clients")), ("fit", ("round", "client", "examples", "steps", "tokens"))):
        assert [[r[f] for f in fields] for r in records(straight.run_dir, kind)] == [[r[f] for f in fields] for r in records(flower.run_dir, kind)]
    # timings, and a Flower node's own load counts (client_app.NodeCache.report), differ by engine
    node_only = lambda k: k.endswith("seconds") or k in ("model_loads", "torch_threads", "shard_disk_hits", "shard_builds")  # noqa: E731
    fit_keys = lambda d: [sorted(k for k in r if not node_only(k)) for r in records(d, "fit")]  # noqa: E731
    assert fit_keys(flower.run_dir) == fit_keys(straight.run_dir)  # the same metrics on both engines
    losses = lambda d, kind: [r["loss"] for r in records(d, kind)]  # noqa: E731
    assert losses(flower.run_dir, "fit") == pytest.approx(losses(straight.run_dir, "fit"), rel=1e-5)
    assert [r["round"] for r in records(flower.run_dir, "eval")] == [0, 1, 2]
    assert losses(flower.run_dir, "eval") == pytest.approx(losses(straight.run_dir, "eval"), rel=1e-5)
    (nodes,) = records(flower.run_dir, "nodes")
    assert nodes["missing"] == [] and sorted(nodes["clients"]) == ["0", "1", "2", "3"]
    assert (flower.run_dir / "partition.json").read_text() == (straight.run_dir / "partition.json").read_text()
    if "eval.federated=true" not in PARITY[setting]:
        return
    # federated evaluation (eval.federated): the nodes score each round's adapter on their own held-out rows
    fed_in, fed_fl = records(straight.run_dir, "federated_eval"), records(flower.run_dir, "federated_eval")
    assert [(r["round"], r["clients"], r["examples"], r["tokens"]) for r in fed_fl] == [(r["round"], r["clients"], r["examples"], r["tokens"]) for r in fed_in]
    assert [r["round"] for r in fed_fl] == [0, 1, 2] and all(len(r["clients"]) == 3 and not r["failed"] for r in fed_fl)
    assert all(numbers_close(a["loss"], b["loss"], FORWARD) for a, b in zip(fed_in[:1], fed_fl[:1]))  # round 0: the same adapter
    assert all(numbers_close(a["loss"], b["loss"], TRAINED) for a, b in zip(fed_in, fed_fl))  # later: adapters equal to TRAINED


def test_a_resumed_flower_run_ends_with_the_uninterrupted_adapter(tiny_overrides, tmp_path):
    """SCAFFOLD variates and error-feedback residuals live on the nodes' disk: a Flower run
    stopped after round 1 and resumed ends where the uninterrupted run does (which the parity
    test above shows is the in-process run's adapter)."""
    common = tiny_overrides + ["flower.client_cpus=1"] + PARITY["scaffold-int4-ef-attack"]
    straight = one_thread_run(load_config(None, common + ["federation.rounds=2", f"output.dir={tmp_path / 'straight'}"]))
    first = load_config(None, common + ["federation.rounds=1", "federation.engine=flower", f"output.dir={tmp_path / 'cut'}"])
    assert simulation.run(first).rounds_done == 1
    (state,) = (tmp_path / "cut" / "node_state").iterdir()  # <state-dir>/<run key>/client_*/round_00001.safetensors
    assert sorted(p.name for p in state.glob("client_*/*.safetensors")) == ["round_00001.safetensors"] * 4

    resumed = simulation.run(load_config(None, common + ["federation.rounds=2", "federation.engine=flower",
                                                        f"output.dir={tmp_path / 'cut'}"]), resume=True)

    assert resumed.finished and resumed.rounds_done == 2
    a, _ = load_adapter(straight.run_dir / "adapter")
    b, _ = load_adapter(resumed.run_dir / "adapter")
    assert adapters_close(a, b)


def test_backend_config_gives_each_client_its_cores_and_gpu_share(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["flower.client_cpus=2", "flower.client_gpus=0.25"])
    assert backend_config(cfg) == {"client_resources": {"num_cpus": 2.0, "num_gpus": 0.25}, "init_args": {"log_to_driver": False}}


def test_a_failed_server_app_raises_its_own_error_after_the_simulation_ends(tiny_overrides, monkeypatch):
    """The CLI exits with the error's code (FederationError: 8), not a KeyError traceback."""
    from fedtune.errors import FederationError
    from fedtune.federation.flower import server_app

    def fails(*args, **kwargs):
        raise FederationError("2 of 4 clients connected within flower.connect_timeout=1s")

    monkeypatch.setattr(server_app, "serve", fails)
    with pytest.raises(FederationError, match="2 of 4 clients connected"):
        simulation.run(load_config(None, tiny_overrides + ["federation.engine=flower", "flower.client_cpus=1"]))
