"""Experiment trackers (``output.trackers``): TensorBoard, MLflow and Weights & Biases mirror
``metrics.jsonl``, offline, under the run directory.

They are sinks of :class:`~fedtune.reporting.metrics.MetricsLog`, the one place a run logs
a record: every record it writes also goes, as scalars, to each tracker, at the record's
round as the step (:func:`scalars` says how a record becomes scalars). The run opens them
once its directory is written and closes them when it returns, however it returns.

==============  ===========================================  ==================================
tracker         where, under the run directory               read it with
==============  ===========================================  ==================================
tensorboard     ``tensorboard/`` (event files)               ``tensorboard --logdir RUN/tensorboard``
mlflow          ``mlruns/mlflow.db`` (MLflow's SQLite store)  ``mlflow ui --backend-store-uri sqlite:///RUN/mlruns/mlflow.db``
wandb           ``wandb/wandb/offline-run-*`` (offline mode)  ``wandb sync RUN/wandb/wandb/offline-run-*``
==============  ===========================================  ==================================

Resume appends to the same tracker run: ``trackers.json`` keeps the MLflow run id and the
W&B run id; TensorBoard purges the events of rounds after the checkpoint (``purge_step``), as
``metrics.jsonl`` is cut back to it. A tracker added on resume first receives the records
the checkpoint covers. A tracker that fails while logging is dropped with a warning
(MetricsLog); ``metrics.jsonl`` still has everything.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from pathlib import Path
from typing import Iterable, Optional, Protocol, Sequence

from fedtune.config import flatten
from fedtune.errors import ConfigError
from fedtune.federation.rundir import MLFLOW_DIR, TENSORBOARD_DIR, TRACKERS_FILE, WANDB_DIR, write_atomic

log = logging.getLogger(__name__)

PROJECT = "fedtune"  # the MLflow experiment and the W&B project
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # tracker -> the package it needs


class Sink(Protocol):
    """What MetricsLog feeds: every logged record, then close."""

    def log(self, record: dict) -> None: ...
    def close(self, failed: bool) -> None: ...


def require_trackers(names: Iterable[str]) -> None:
    """One ConfigError line naming the install command of each chosen tracker that is missing."""
    missing = [n for n in names if importlib.util.find_spec(MODULES[n]) is None]
    if missing:
        extras = ",".join(missing)
        raise ConfigError(f"output.trackers: {', '.join(missing)} not installed; pip install 'fedtune[{extras}]' "
                          "or remove it from output.trackers")


def scalars(record: dict) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of a metrics record: its round, and every number in it (nested
    dicts joined with ``/``), under ``<type>/``; a fit, failure or rejected line under
    ``<type>/client_<id>/``. Strings, lists, booleans and nulls are left out."""
    kind, step = str(record.get("type", "record")), int(record.get("round") or 0)
    prefix = f"{kind}/client_{record['client']}" if "client" in record and not isinstance(record["client"], (dict, list)) else kind
    out: dict[str, float] = {}

    def walk(value, tag: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{tag}/{k}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)

    for key, value in record.items():
        if key not in ("type", "round", "client"):
            walk(value, f"{prefix}/{key}")
    return step, out


class TensorBoard:
    def __init__(self, run_dir: Path, start_round: int, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        # resumed: events of rounds after the checkpoint are dropped, as metrics.jsonl is cut back
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=start_round + 1 if resumed else None)

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class MLflow:
    """MLflow's SQLite store in ``mlruns/`` (its file store is in maintenance mode and refuses
    new runs unless told otherwise); artifacts, if any, in ``mlruns/artifacts``."""

    def __init__(self, run_dir: Path, run_id: Optional[str], params: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        folder = (run_dir / MLFLOW_DIR).resolve()
        folder.mkdir(exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        if run_id is None:
            exp = self.client.get_experiment_by_name(PROJECT)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(PROJECT, artifact_location=(folder / "artifacts").as_uri())
            run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            items = [Param(_mlflow_key(k), str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=items[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        step, values = scalars(record)
        now = int(time.time() * 1000)
        if values:
            self.client.log_batch(self.run_id, metrics=[Metric(_mlflow_key(k), v, now, step) for k, v in values.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _mlflow_key(key: str) -> str:
    """MLflow names take letters, digits, ``_ - . /`` and spaces; anything else becomes ``_``."""
    return re.sub(r"[^\w\-. /]", "_", key)


class WandB:
    """W&B in offline mode (no account, no network); ``wandb sync`` uploads the run later.
    Steps are the ``round`` metric (``define_metric``), so a resumed run may log a round again."""

    def __init__(self, run_dir: Path, run_id: Optional[str], config: dict):
        import wandb

        folder = run_dir / WANDB_DIR
        folder.mkdir(exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True, save_code=False)
        self.run = wandb.init(
            project=PROJECT, name=run_dir.name, id=run_id, resume="allow", dir=str(folder),
            mode="offline", config=config, settings=settings, reinit="create_new",
        )
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")
        self.run_id = self.run.id

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        if values:
            self.run.log({**values, "round": step})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_trackers(names: Sequence[str], run_dir: Path, *, config: dict, start_round: int = 0,
                  history: Sequence[dict] = ()) -> list[Sink]:
    """Open the chosen trackers for the run in ``run_dir``, starting after ``start_round``
    (0: a new run). ``history`` are the records the run kept from before (resume): a tracker
    this run directory did not have yet receives them first. ``config`` is the run's config
    as a nested dict (MLflow params, W&B config)."""
    if not names:
        return []
    require_trackers(names)
    state_path = run_dir / TRACKERS_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    resumed = start_round > 0
    sinks: list[Sink] = []
    for name in names:
        new = name not in state
        if name == "tensorboard":
            sink: Sink = TensorBoard(run_dir, start_round, resumed and not new)
            state[name] = TENSORBOARD_DIR
        elif name == "mlflow":
            sink = MLflow(run_dir, state.get(name), flatten(config))
            state[name] = sink.run_id
        else:
            sink = WandB(run_dir, state.get(name), config)
            state[name] = sink.run_id
        write_atomic(state_path, json.dumps(state, indent=1))
        if new:
            for record in history:
                sink.log(record)
        sinks.append(sink)
    return sinks
