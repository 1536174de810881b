"""A real Flower deployment on 127.0.0.1: a `flower-superlink` and two `flower-supernode`
processes, each SuperNode with its own data file (`--node-config data-path=... client-id=N`),
the run started with `flwr run` through fedtune's wrapper. Then a SuperNode goes away in the
middle of a resumed third round."""

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.federation import setup
from fedtune.federation.checkpoint import latest_checkpoint, load_checkpoint
from fedtune.federation.flower.deploy import COMPLETED, flwr_run
from fedtune.federation.flower.localnet import LocalDeployment, _descendants
from fedtune.federation.inprocess import run
from fedtune.model.lora import load_adapter
from tests.run_records import records
from tests.tolerance import adapters_close

ROOT = Path(__file__).resolve().parents[3]


def write_rows(path: Path, examples) -> Path:
    path.write_text("".join(json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output, "category": e.category}) + "\n"
                            for e in examples))
    return path


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_two_supernodes_with_their_own_files_match_the_in_process_engine(tiny_model_dir, tmp_path):
    # Arrange: the in-process run, and its partition written out as one file per data owner
    common = [
        f"model.name={tiny_model_dir}", "train.precision=fp32", "data.demo_per_category=30", "data.max_length=64", "partition.method=shards",
        "partition.num_clients=2", "partition.holdout_per_category=3", "federation.rounds=2", "train.local_steps=3",
        "train.batch_size=4", "train.lr=0.002", "eval.num_samples=1", "eval.max_new_tokens=4",
    ]
    inprocess = run(load_config(None, common + [f"output.dir={tmp_path / 'inprocess'}"]))
    examples, _, partition = setup.load_and_split(inprocess_cfg := load_config(None, common))
    files = [write_rows(tmp_path / f"owner-{c}.jsonl", [examples[i] for i in shard]) for c, shard in enumerate(partition.shards)]
    held = write_rows(tmp_path / "server-heldout.jsonl", [examples[i] for i in partition.holdout])
    flower = common + ["federation.engine=flower", f"flower.heldout_path={held}", f"output.dir={tmp_path / 'flower'}",
                       "flower.connect_timeout=180"]
    nodes = [{"data-path": str(f), "client-id": c} for c, f in enumerate(files)]

    with LocalDeployment(tmp_path / "net", nodes) as net:
        # Act: two rounds
        status = flwr_run(load_config(None, flower), net.superlink, insecure=True)

        # Assert: the run directory, metrics and adapter are the in-process engine's
        assert status["status"] == COMPLETED, status
        run_dir = tmp_path / "flower"
        for name in ("config.yaml", "partition.json", "metrics.jsonl", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
            assert (run_dir / name).is_file(), name
        assert load_config(run_dir / "config.yaml").federation.engine == "flower"
        assert load_checkpoint(latest_checkpoint(run_dir)).round == 2
        (nodes_line,) = records(run_dir, "nodes")
        assert nodes_line["clients"] == {str(c): len(s) for c, s in enumerate(partition.shards)}
        fits = lambda d: [(r["round"], r["client"], r["examples"], r["steps"], r["tokens"]) for r in records(d, "fit")]  # noqa: E731
        losses = lambda d, kind: [r["loss"] for r in records(d, kind)]  # noqa: E731
        assert fits(run_dir) == fits(inprocess.run_dir) and len(fits(run_dir)) == 4
        assert losses(run_dir, "fit") == pytest.approx(losses(inprocess.run_dir, "fit"), rel=1e-5)
        assert [r["round"] for r in records(run_dir, "eval")] == [0, 1, 2]
        assert losses(run_dir, "eval") == pytest.approx(losses(inprocess.run_dir, "eval"), rel=1e-5)
        a, _ = load_adapter(inprocess.run_dir / "adapter")
        b, _ = load_adapter(run_dir / "adapter")
        assert a.keys() == b.keys() and adapters_close(a, b)
        # each node's worker process served both rounds: one model load, the shard tokenised once
        assert [(r["round"], r["model_loads"]) for r in records(run_dir, "fit")] == [(1, 1), (1, 1), (2, 1), (2, 1)]
        assert [("model_load_seconds" in r, "tokenise_seconds" in r) for r in records(run_dir, "fit")] == [(True, True)] * 2 + [(False, False)] * 2

        # Act: resume for a third round; SuperNode 1 goes away while it trains
        log1 = tmp_path / "net" / "supernode-1.log"
        trains = lambda: len(re.findall(r"Receiving: train message", log1.read_text()))  # noqa: E731
        result = {}
        # (without a round timeout the SuperLink would answer for the lost node after two missed heartbeats, ~1 min)
        extended = load_config(None, flower + ["federation.rounds=3", "flower.round_timeout=30"])
        third = threading.Thread(target=lambda: result.update(flwr_run(extended, net.superlink, insecure=True, resume=True)))
        third.start()
        wait_for(lambda: trains() == 3, timeout=300)
        net.kill_node(1)
        third.join(timeout=300)
        pids = [p.pid for p in net.procs] + [d for p in net.procs for d in _descendants(p.pid)]

    # Assert: round 3 went on with client 0, the failure is in the log, and every process is gone
    assert result["status"] == COMPLETED, result
    assert [(r["round"], r["client"]) for r in records(run_dir, "fit")][-1] == (3, 0)
    (failed,) = records(run_dir, "failure")
    assert failed["round"] == 3 and failed["client"] == 1 and failed["reason"]
    assert load_checkpoint(latest_checkpoint(run_dir)).round == 3
    assert not [pid for pid in pids if alive(pid)]
    assert inprocess_cfg.partition.num_clients == 2


def test_tls_and_supernode_authentication(tiny_model_dir, tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "scripts" / "make-certs.sh"), str(certs), "1"], check=True, capture_output=True, timeout=120)
    cfg = load_config(None, [
        f"model.name={tiny_model_dir}", "train.precision=fp32", "data.demo_per_category=10", "data.max_length=48", "partition.num_clients=1",
        "partition.holdout_per_category=2", "federation.rounds=1", "train.local_steps=2", "eval.num_samples=0",
        "federation.engine=flower", f"output.dir={tmp_path / 'run'}", "flower.connect_timeout=180",
    ])

    # Flower's default --isolation subprocess here (a flwr-clientapp per message); the other test runs the worker
    with LocalDeployment(tmp_path / "net", [{"partition-id": 0}], certificates=certs, authenticate=True, warm=False) as net:
        status = flwr_run(cfg, net.superlink, root_certificates=certs / "ca.crt")

    assert status["status"] == COMPLETED, status
    assert [r["client"] for r in records(tmp_path / "run", "fit")] == [0]
    assert "SuperNode authentication is disabled" not in (tmp_path / "net" / "superlink.log").read_text()
    assert not (tmp_path / "net" / "worker-0.log").exists()
