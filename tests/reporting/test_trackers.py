"""output.trackers: TensorBoard, MLflow and W&B mirror metrics.jsonl, read back with each tool's own reader."""

import json
import struct
from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.federation.inprocess import run
from fedtune.federation.rundir import MLFLOW_DIR, TENSORBOARD_DIR, TRACKERS_FILE, WANDB_DIR
from fedtune.reporting import trackers
from fedtune.reporting.metrics import MetricsLog, read_metrics
from fedtune.reporting.trackers import scalars


def test_scalars_take_every_number_at_the_records_round():
    step, values = scalars({"type": "eval", "round": 2, "loss": 1.5, "ppl": 4.48, "epsilon": 3,
                            "per_category": {"math": {"loss": 1.25, "examples": 4}}, "note": "x", "ok": True})
    assert step == 2
    assert values == {"eval/loss": 1.5, "eval/ppl": 4.48, "eval/epsilon": 3.0, "eval/per_category/math/loss": 1.25,
                      "eval/per_category/math/examples": 4.0}
    step, values = scalars({"type": "fit", "round": 1, "client": 3, "loss": 0.5, "upload_bytes": 1024, "norm": None})
    assert (step, values) == (1, {"fit/client_3/loss": 0.5, "fit/client_3/upload_bytes": 1024.0})
    assert scalars({"type": "round", "round": 1, "clients": [0, 1], "skipped": None, "seconds": 2.0}) == (1, {"round/seconds": 2.0})


def test_a_failing_tracker_is_dropped_and_the_log_goes_on(tmp_path):
    class Broken:
        closed = False

        def log(self, record):
            raise RuntimeError("disk gone")

        def close(self, failed):
            Broken.closed = True

    with MetricsLog(tmp_path / "m.jsonl", [Broken()]) as metrics:
        metrics.log({"type": "eval", "round": 0, "loss": 1.0})
        metrics.log({"type": "eval", "round": 1, "loss": 0.5})
        assert metrics.sinks == []
    assert [r["loss"] for r in read_metrics(tmp_path / "m.jsonl")] == [1.0, 0.5]


def test_unknown_or_missing_trackers_are_one_config_error(tiny_overrides, monkeypatch):
    with pytest.raises(ConfigError, match=r"output.trackers: .* choose from tensorboard, mlflow, wandb"):
        load_config(None, tiny_overrides + ["output.trackers=[tensorbord]"])
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    cfg = load_config(None, tiny_overrides + ["output.trackers=[tensorboard,wandb]"])
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert str(err.value) == "output.trackers: wandb not installed; pip install 'fedtune[wandb]' or remove it from output.trackers"
    assert not Path(cfg.output.dir).exists()  # refused before anything was written


# ----------------------------------------------------------------------------- the tools' own readers


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def mlflow_history(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / MLFLOW_DIR / 'mlflow.db').resolve()}")
    run_id = json.loads((run_dir / TRACKERS_FILE).read_text())["mlflow"]
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, tag))


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of every offline run folder, read from the .wandb files: LevelDB-log
    framing (the format wandb's former DataStore read) around wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted((run_dir / WANDB_DIR).glob("wandb/offline-run-*/run-*.wandb")):
        buf, pos, parts = path.read_bytes(), 7, b""
        assert buf[:4] == b":W&B"
        while pos + 7 <= len(buf):
            if 32768 - pos % 32768 < 7:  # block trailer
                pos += 32768 - pos % 32768
                continue
            _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
            if kind == 0:
                break
            parts, pos = parts + buf[pos + 7:pos + 7 + n], pos + 7 + n
            if kind in (1, 4):  # full record, or last fragment
                record = pb.Record()
                record.ParseFromString(parts)
                parts = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def same(got: list, want: list, rel: float) -> bool:
    """(step, value) pairs: the same steps, values equal to ``rel`` (TensorBoard stores float32: 1e-6)."""
    return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["round"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "eval"]


def test_a_run_mirrors_metrics_into_each_tracker_and_resume_appends_to_the_same_runs(tiny_overrides, tmp_path):
    overrides = tiny_overrides + ["federation.rounds=1", "output.trackers=[tensorboard,mlflow,wandb]"]
    run_dir = Path(load_config(None, overrides).output.dir)
    run(load_config(None, overrides))
    ids = json.loads((run_dir / TRACKERS_FILE).read_text())
    losses = eval_losses(run_dir)
    assert [r for r, _ in losses] == [0, 1]
    assert same(tensorboard_scalars(run_dir, "eval/loss"), losses, 1e-6)
    assert same(mlflow_history(run_dir, "eval/loss"), losses, 1e-12)
    rows = wandb_history(run_dir)
    assert same([(r["round"], r["eval/loss"]) for r in rows if "eval/loss" in r], losses, 1e-12)
    fits = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "fit"]
    client = fits[0]["client"]
    assert same(mlflow_history(run_dir, f"fit/client_{client}/loss"), [(1, fits[0]["loss"])], 1e-12)
    categories = [r["per_category"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "eval"][-1]
    name = next(iter(categories))
    assert same(tensorboard_scalars(run_dir, f"eval/per_category/{name}/loss")[-1:], [(1, categories[name]["loss"])], 1e-6)

    run(load_config(None, overrides + ["federation.rounds=2"]), resume=True)  # one more round, the same tracker runs
    assert json.loads((run_dir / TRACKERS_FILE).read_text()) == ids
    losses = eval_losses(run_dir)
    assert [r for r, _ in losses] == [0, 1, 2]
    assert same(tensorboard_scalars(run_dir, "eval/loss"), losses, 1e-6)
    assert same(mlflow_history(run_dir, "eval/loss"), losses, 1e-12)
    folders = list((run_dir / WANDB_DIR).glob("wandb/offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(ids["wandb"]) or f.name.endswith(f"{ids['wandb']}-1") for f in folders)
    assert same([(r["round"], r["eval/loss"]) for r in wandb_history(run_dir) if "eval/loss" in r], losses, 1e-12)


def test_a_tracker_added_on_resume_gets_the_runs_history(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=1"])
    run(cfg)
    run(load_config(None, tiny_overrides + ["federation.rounds=2", "output.trackers=[tensorboard]"]), resume=True)
    run_dir = Path(cfg.output.dir)
    assert same(tensorboard_scalars(run_dir, "eval/loss"), eval_losses(run_dir), 1e-6)
