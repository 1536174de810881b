"""The engine with every strategy: exact resume (strategy state and client state), client
dropout with min_clients, heterogeneous local steps."""

import threading

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import STRATEGIES, load_config
from fedtune.federation.checkpoint import latest_checkpoint, load_checkpoint
from fedtune.federation.inprocess import run
from fedtune.model.lora import load_adapter
from fedtune.reporting.progress import Progress
from fedtune.server.sampling import local_steps_per_client
from tests.federation.test_inprocess import StopAfter, records
from tests.tolerance import close

SMALL = [
    "data.demo_per_category=10",
    "partition.num_clients=3",
    "partition.holdout_per_category=1",
    "~federation.clients_per_round",  # all three clients every round: client state carries over
    "federation.rounds=2",
    "train.local_steps=1",
    "eval.num_samples=0",
]
PARAMS = {"fedadagrad": ["strategy.server_lr=0.003", "strategy.tau=1e-6"], "fedadam": ["strategy.server_lr=0.003", "strategy.tau=1e-6"],
          "fedyogi": ["strategy.server_lr=0.003", "strategy.tau=1e-6"], "fedprox": ["strategy.mu=0.5"], "fedavgm": ["strategy.momentum=0.5"]}


class CrashIn(Progress):
    """Dies (as a kill would) right after the first client of round ``n`` finished."""

    def __init__(self, n):
        self.n = n

    def client_finished(self, round, client, metrics):
        if round == self.n:
            raise KeyboardInterrupt


def assert_same_run(a, b):
    fa, _ = load_adapter(a / "adapter")
    fb, _ = load_adapter(b / "adapter")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    sa, sb = load_checkpoint(latest_checkpoint(a)).strategy_state, load_checkpoint(latest_checkpoint(b)).strategy_state
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    key = lambda r: [(x["round"], x["client"], x["loss"]) for x in records(r, "fit")]  # noqa: E731
    assert key(a) == key(b)


@pytest.mark.parametrize("name", STRATEGIES)
def test_resume_equals_uninterrupted_for_every_strategy(name, tiny_overrides, tmp_path):
    base = tiny_overrides + SMALL + [f"strategy.name={name}"] + PARAMS.get(name, [])
    straight = run(load_config(None, base + [f"output.dir={tmp_path / 'straight'}"]))

    cut = load_config(None, base + [f"output.dir={tmp_path / 'cut'}"])
    stop = threading.Event()
    assert run(cut, progress=StopAfter(stop, 1), stop=stop).rounds_done == 1
    resumed = run(cut, resume=True)

    assert resumed.finished
    assert_same_run(straight.run_dir, resumed.run_dir)


def test_scaffold_resumes_exactly_after_a_crash_mid_round(tiny_overrides, tmp_path):
    base = tiny_overrides + SMALL + ["strategy.name=scaffold", "federation.rounds=3"]
    straight = run(load_config(None, base + [f"output.dir={tmp_path / 'straight'}"]))

    crashed = load_config(None, base + [f"output.dir={tmp_path / 'crashed'}"])
    with pytest.raises(KeyboardInterrupt):
        run(crashed, progress=CrashIn(2))
    store = tmp_path / "crashed" / "client_state"
    assert (store / "client_00000" / "round_00002.safetensors").is_file()  # written after the last checkpoint (round 1)
    resumed = run(crashed, resume=True)

    assert resumed.finished
    assert_same_run(straight.run_dir, resumed.run_dir)


def test_dropout_min_clients_and_heterogeneous_steps(tiny_overrides, tmp_path):
    # seed 1, dropout 0.5, three clients: round 1 all return; round 2 clients 1 and 2 fail, so
    # only one update arrives, fewer than min_clients=2: the round is skipped; round 3 client 0 fails.
    cfg = load_config(None, tiny_overrides + SMALL + [
        "seed=1", "federation.rounds=3", "federation.dropout=0.5", "federation.min_clients=2",
        "strategy.name=scaffold", "train.local_steps_per_client=[1, 2]",
    ])
    result = run(cfg)
    d = result.run_dir

    failures = [(f["round"], f["client"]) for f in records(d, "failure")]
    assert failures == [(2, 1), (2, 2), (3, 0)]
    assert all("simulated dropout (federation.dropout=0.5)" == f["reason"] for f in records(d, "failure"))
    rounds = records(d, "round")
    assert [r["failed"] for r in rounds] == [[], [1, 2], [0]]
    assert [r["skipped"] is not None for r in rounds] == [False, True, False]
    assert "1 of 3 clients returned, fewer than federation.min_clients=2" in rounds[1]["skipped"]
    evals = {e["round"]: e["loss"] for e in records(d, "eval")}
    assert evals[2] == evals[1] and evals[3] != evals[2]  # a skipped round leaves the global adapter as it was

    fits = records(d, "fit")
    assert [(f["round"], f["client"]) for f in fits] == [(1, 0), (1, 1), (1, 2), (2, 0), (3, 1), (3, 2)]
    steps = local_steps_per_client([1, 2], 3, seed=1)
    assert len(set(steps)) == 2 and all(f["steps"] == steps[f["client"]] for f in fits)

    # SCAFFOLD's invariant c = mean_i c_i over all clients holds: the skipped round's client state was rolled back
    c = load_checkpoint(latest_checkpoint(d)).strategy_state
    store = d / "client_state"
    assert not (store / "client_00000" / "round_00002.safetensors").exists()
    own = []
    for client in range(3):
        files = sorted((store / f"client_{client:05d}").glob("round_*.safetensors"))
        own.append({k.partition("/")[2]: v for k, v in load_file(str(files[-1])).items() if k.startswith("control/")})
    for key, value in c.items():
        k = key.removeprefix("control.")
        assert close(value, sum(o[k] for o in own) / 3, 1e-5)  # kept incrementally vs summed at the end


def test_too_few_updates_after_real_failures_fail_the_run_with_the_checkpoint_intact(tiny_overrides, tmp_path):
    """The one "too few updates" rule, in the round loop: simulated (seeded) dropouts skip the
    round (above); a real failure (a node gone) fails the run, resumable from the last checkpoint."""
    from fedtune.errors import AggregationError
    from fedtune.federation.inprocess import local_clients
    from fedtune.types import ClientFailure

    class NodesGoneInRound2:  # a transport (Clients protocol) whose clients fail for real in round 2
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getattr__(self, name):  # sizes, steps, rollback
            return getattr(self.inner, name)

        def fit(self, round, clients, *args):
            if round == 2:
                return [], [ClientFailure(c, "no reply within flower.round_timeout=1s") for c in clients]
            return self.inner.fit(round, clients, *args)

    cfg = load_config(None, tiny_overrides + SMALL + ["federation.rounds=3", f"output.dir={tmp_path / 'r'}"])
    with pytest.raises(AggregationError, match=r"round 2: 0 of 3 clients returned, fewer than federation.min_clients=1 .*"
                                               r"checkpoint of round 1 is intact"):
        run(cfg, connect=lambda *a: NodesGoneInRound2(local_clients(*a)))

    assert load_checkpoint(latest_checkpoint(tmp_path / "r")).round == 1
    assert [f["client"] for f in records(tmp_path / "r", "failure")] == [0, 1, 2]  # logged with their reasons
    assert run(cfg, resume=True).rounds_done == 3


def test_a_secure_sum_counts_as_its_members_for_federation_min_clients(tiny_overrides, tmp_path):
    """With privacy.secure_aggregation the transport returns ONE pre-summed update standing for
    its members (federation/flower/secagg.py); federation.min_clients counts the members, so a
    sum of 3 clients passes min_clients=2 (it used to count the one sum and fail every round)."""
    import dataclasses

    from fedtune.federation.flower import secagg
    from fedtune.federation.inprocess import local_clients
    from fedtune.types import ClientUpdate

    class SummingTransport:  # what SecAgg+ hands the loop: the example-weighted mean, and who is in it
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getattr__(self, name):  # sizes, steps, rollback
            return getattr(self.inner, name)

        def fit(self, round, clients, *args):
            updates, failures = self.inner.fit(round, clients, *args)
            n = sum(u.num_examples for u in updates)
            mean = {k: sum(u.delta[k] * u.num_examples for u in updates) / n for k in updates[0].delta}
            members = [ClientUpdate(u.client_id, u.num_examples, {}, u.metrics) for u in updates]
            return [ClientUpdate(secagg.SUM_ID, n, mean, {secagg.MEMBERS: members})], failures

    cfg = load_config(None, tiny_overrides + SMALL + ["federation.rounds=2", "federation.min_clients=2", f"output.dir={tmp_path / 'r'}"])
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, secure_aggregation=True))  # the engine check is config's

    result = run(cfg, connect=lambda *a: SummingTransport(local_clients(*a)))

    assert result.rounds_done == 2
    assert [(f["round"], f["client"]) for f in records(tmp_path / "r", "fit")] == [
        (r["round"], c) for r in records(tmp_path / "r", "round") for c in r["clients"]]
    assert not records(tmp_path / "r", "rejected")
