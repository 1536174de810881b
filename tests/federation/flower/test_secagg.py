"""Secure aggregation (federation/flower/secagg.py): the pure parts, the config refusals, and a
real loopback deployment (SuperLink + 3 SuperNodes): the SecAgg+ aggregate equals plain FedAvg
within the quantisation tolerance, and a SuperNode killed in the middle of a round does not stop it."""

import re
import threading

import numpy as np
import pytest
import torch

from fedtune.config import load_config
from fedtune.errors import AggregationError, ConfigError
from fedtune.federation import setup
from fedtune.federation.checkpoint import latest_checkpoint, load_checkpoint
from fedtune.federation.flower import secagg
from fedtune.federation.flower.deploy import COMPLETED, flwr_run
from fedtune.federation.flower.localnet import LocalDeployment, _descendants
from fedtune.federation.inprocess import run
from fedtune.types import ClientUpdate
from tests.federation.flower.test_localnet import alive, records, wait_for

# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("k, expected", [(1, 2**30), (2, 2**30), (3, 2**30), (4, 2**29), (7, 2**29), (8, 2**28), (100, 2**25)])
def test_quantization_range_leaves_no_room_for_the_sum_to_wrap(k, expected):
    t = secagg.quantization_range(k)

    assert t == expected
    assert k * t < secagg.MODULUS and 2 * k * t >= secagg.MODULUS or t == secagg.MAX_RANGE


def test_tolerance_is_k_quantisation_steps_over_the_summed_weights():
    # 3 clients, 10/20/40 examples: W = 40, sum(n/W) = 1.75, step 2C/T = 2 * 0.5 / 2**30
    assert secagg.tolerance([10, 20, 40], 0.5) == pytest.approx(3 * (1.0 / 2**30) / 1.75, rel=1e-12)
    assert secagg.max_weight([10, 40, 20]) == 40.0


def test_flat_and_unflat_round_trip_in_sorted_key_order():
    adapter = {"b.lora_B.weight": torch.arange(6.0).reshape(3, 2), "a.lora_A.weight": torch.tensor([[0.5, -0.25]])}

    arrays = secagg.flat(adapter)
    back = secagg.unflat(arrays, adapter)

    assert [a.dtype for a in arrays] == [np.float64, np.float64] and arrays[0].shape == (1, 2)
    assert list(back) == list(adapter) and all(torch.equal(back[k], adapter[k]) and back[k].dtype == torch.float32 for k in adapter)


def test_unflat_refuses_a_sum_that_does_not_fit_the_global_adapter():
    like = {"a": torch.zeros(2, 2)}

    with pytest.raises(AggregationError, match="tensor a has shape"):
        secagg.unflat([np.zeros((2, 3))], like)
    with pytest.raises(AggregationError, match="2 tensors"):
        secagg.unflat([np.zeros((2, 2))] * 2, like)


def test_count_clipped_counts_weighted_values_beyond_the_clip():
    arrays = [np.array([0.5, -1.5, 3.0]), np.array([[2.2]])]

    assert secagg.count_clipped(arrays, 1.0, 1.0) == 3
    assert secagg.count_clipped(arrays, 0.5, 1.0) == 2  # halved: 1.5 and 1.1 are beyond 1, 0.75 is not
    assert secagg.count_clipped(arrays, 0.25, 1.0) == 0


def test_members_are_the_clients_in_the_sum():
    inside = [ClientUpdate(0, 5, {}, {"loss": 1.0}), ClientUpdate(2, 7, {}, {"loss": 2.0})]
    update = ClientUpdate(secagg.SUM_ID, 12, {"a": torch.zeros(1)}, {secagg.MEMBERS: inside})

    assert [u.client_id for u in secagg.members(update)] == [0, 2]


# ----------------------------------------------------------------------------- config


SECURE = ["federation.engine=flower", "privacy.secure_aggregation=true"]


@pytest.mark.parametrize("override, key", [
    ("federation.engine=inprocess", "privacy.secure_aggregation: needs federation.engine=flower"),
    ("strategy.aggregator=median", "strategy.aggregator: median needs the individual updates"),
    ("privacy.norm_bound_factor=5", "privacy.norm_bound_factor: the server cannot measure"),
    ("strategy.name=scaffold", "strategy.name: scaffold's control variates"),
    ("compression.method=int4", "compression.method: int4 payloads"),
    ("federation.clients_per_round=1", "privacy.secure_aggregation: a sum of one update"),
])
def test_config_refuses_what_needs_individual_updates(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, SECURE + ["partition.num_clients=3", override])

    assert key in str(err.value) and str(err.value).count("\n") == 0


def test_config_refuses_central_dp_with_secure_aggregation():
    with pytest.raises(ConfigError, match="privacy.dp: central DP clips each update on the server"):
        load_config(None, SECURE + ["partition.num_clients=3", "privacy.dp=central", "privacy.clip_norm=1"])


def test_config_accepts_secure_aggregation_with_attacks_and_local_dp():
    cfg = load_config(None, SECURE + ["partition.num_clients=3", "attack.fraction=0.34", "privacy.dp=local", "privacy.clip_norm=1"])

    assert secagg.settings(cfg) == secagg.SecAgg(1.0, 0.67)
    assert setup.norm_bound_factor(cfg) is None


# ----------------------------------------------------------------------------- loopback deployment


def test_secure_aggregation_on_a_local_deployment_equals_fedavg_and_survives_a_dropped_node(tiny_model_dir, tmp_path):
    # Arrange: plain FedAvg in-process, one round, 3 clients
    common = [
        f"model.name={tiny_model_dir}", "train.precision=fp32", "data.demo_per_category=10", "data.max_length=48",
        "partition.num_clients=3", "partition.holdout_per_category=2", "federation.rounds=1", "train.local_steps=2",
        "train.batch_size=4", "train.lr=0.002", "eval.num_samples=0",
        "eval.federated=false",  # auto would switch it on in the deployment, holding rows out of training there only
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each SuperNode (OMP_NUM_THREADS=1 below): the same float sums, so only SecAgg+ differs
    try:
        plain = run(load_config(None, common + [f"output.dir={tmp_path / 'inprocess'}"]))
    finally:
        torch.set_num_threads(threads)
    flower = common + ["federation.engine=flower", "privacy.secure_aggregation=true", f"output.dir={tmp_path / 'secure'}",
                       "flower.connect_timeout=180"]
    run_dir = tmp_path / "secure"

    with LocalDeployment(tmp_path / "net", [{"partition-id": c} for c in range(3)], env={"OMP_NUM_THREADS": "1"}) as net:
        # Act: round 1 through SecAgg+
        first = flwr_run(load_config(None, flower), net.superlink, insecure=True)

        # Assert: the unmasked mean is FedAvg's, within the quantisation tolerance (+ a few float32 ulps of the adapter)
        assert first["status"] == COMPLETED, first
        sizes = [r["examples"] for r in records(run_dir, "fit")]
        assert [r["client"] for r in records(run_dir, "fit")] == [0, 1, 2] and all(r["secagg_clipped"] == 0 for r in records(run_dir, "fit"))
        a = load_checkpoint(latest_checkpoint(plain.run_dir)).adapter
        b = load_checkpoint(latest_checkpoint(run_dir)).adapter
        bound = secagg.tolerance(sizes, 1.0)
        for k in a:
            scale = float(a[k].abs().max())
            assert float((a[k] - b[k]).abs().max()) <= bound + 1e-6 * scale, k
        assert any(float(b[k].abs().max()) > 0 for k in b)

        # Act: round 2; SuperNode 2 is killed once it received the collect stage (it trains), after sharing its keys
        log2 = tmp_path / "net" / "supernode-2.log"
        trains = lambda: len(re.findall(r"Receiving: train message", log2.read_text()))  # noqa: E731
        before, result = trains(), {}
        second_cfg = load_config(None, flower + ["federation.rounds=2", "flower.round_timeout=60"])
        second = threading.Thread(target=lambda: result.update(flwr_run(second_cfg, net.superlink, insecure=True, resume=True)))
        second.start()
        wait_for(lambda: trains() >= before + 3, timeout=300)
        net.kill_node(2)
        second.join(timeout=400)
        pids = [p.pid for p in net.procs] + [d for p in net.procs for d in _descendants(p.pid)]

    # Assert: the round summed clients 0 and 1 (client 2's masks were removed with its peers' shares)
    assert result["status"] == COMPLETED, result
    assert [(r["round"], r["client"]) for r in records(run_dir, "fit")][-2:] == [(2, 0), (2, 1)]
    (failed,) = records(run_dir, "failure")
    assert failed["round"] == 2 and failed["client"] == 2 and "SecAgg+" in failed["reason"]
    assert load_checkpoint(latest_checkpoint(run_dir)).round == 2
    assert all(torch.isfinite(t).all() for t in load_checkpoint(latest_checkpoint(run_dir)).adapter.values())
    assert not [pid for pid in pids if alive(pid)]
