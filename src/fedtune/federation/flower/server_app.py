"""The fedtune ServerApp: the in-process engine's setup, strategy, evaluation, checkpoints and
round loop (``fedtune.federation.inprocess.run``), with Flower as the way to reach clients.
No math here.

The server's data: by default the run's ``data.path`` is read and split as in-process (the
simulation, or SuperNodes started with ``partition-id``); only its held-out rows are used here.
When the data owners hold their own files (SuperNodes with ``data-path``), the server never
sees their data: ``flower.heldout_path`` names a server-side file whose rows are all held out.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Optional, Sequence

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import RunConfig
from fedtune.errors import DataError
from fedtune.federation import inprocess, setup
from fedtune.federation.flower import secagg
from fedtune.federation.flower.runconfig import RESUME_KEY, config_from_run_config
from fedtune.federation.flower.transport import FlowerClients
from fedtune.federation.rundir import RunLock, RunResult
from fedtune.reporting.progress import Progress, federated_line

log = logging.getLogger(__name__)

NODE_DATA = "node-data"  # partition method recorded when the clients' data stays on the nodes


def server_data(cfg: RunConfig) -> tuple[list, object, setup.Partition]:
    """(examples, load report, partition) the server works with (see the module docstring)."""
    if cfg.flower.heldout_path is None:
        try:
            return setup.load_and_split(cfg)
        except DataError as err:
            raise DataError(f"{err} (on the server; when the SuperNodes hold the data, set flower.heldout_path "
                            "to a held-out file on the server instead)") from None
    held = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=cfg.flower.heldout_path))
    examples, report = setup.load_data(held)
    partition = setup.Partition(
        [[] for _ in range(cfg.partition.num_clients)], list(range(len(examples))), NODE_DATA, setup.fingerprint(examples)
    )
    return examples, report, partition


def serve(grid: Grid, cfg: RunConfig, *, resume: bool, progress: Progress, stop: Optional[threading.Event] = None,
          from_round: Optional[int] = None, lock: Optional[RunLock] = None) -> RunResult:
    """Run the federation ``cfg`` describes with the clients behind ``grid`` (the run directory
    locked here, or by the caller that passes ``lock``)."""

    def connect(cfg: RunConfig, bundle, shards, progress: Progress, metrics) -> FlowerClients:
        return FlowerClients(
            grid, num_clients=cfg.partition.num_clients, min_clients=cfg.federation.min_clients, progress=progress,
            metrics=metrics, connect_timeout=cfg.flower.connect_timeout, round_timeout=cfg.flower.round_timeout,
            compression=setup.compression_of(cfg), secure=secagg.settings(cfg),
        )

    return inprocess.run(cfg, resume=resume, from_round=from_round, progress=progress, stop=stop, data=server_data,
                         connect=connect, lock=lock)


class LogProgress(Progress):
    """Progress as log lines (a deployed ServerApp has no terminal; `flwr log` shows them)."""

    def round_started(self, round: int, clients: Sequence[int]) -> None:
        log.info("round %d: clients %s", round, list(clients))

    def client_finished(self, round: int, client: int, metrics: dict) -> None:
        log.info("round %d client %d: loss %.4f, %d steps, %.1fs", round, client, metrics["loss"], metrics["steps"], metrics["seconds"])

    def evaluated(self, round: int, result: dict) -> None:
        privacy = f", epsilon {result['epsilon']:.3g} (delta {result['delta']:g})" if "epsilon" in result else ""
        log.info("round %d held-out: loss %.4f, perplexity %.2f%s", round, result["loss"], result["ppl"], privacy)

    def federated_evaluated(self, round: int, result: dict) -> None:
        log.info("round %d %s", round, federated_line(result))

    def round_finished(self, round: int, seconds: float) -> None:
        log.info("round %d done in %.1fs", round, seconds)

    def message(self, text: str) -> None:
        log.info("%s", text)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point (``flwr run``): the config and resume flag come in the run config."""
    # This process is an application entry point, like the CLI: show fedtune's INFO lines.
    fedtune_log = logging.getLogger("fedtune")
    if not fedtune_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedtune %(levelname)s: %(message)s"))
        fedtune_log.addHandler(handler)
        fedtune_log.setLevel(logging.INFO)
    cfg = config_from_run_config(context.run_config)
    result = serve(grid, cfg, resume=bool(context.run_config.get(RESUME_KEY)), progress=LogProgress())
    log.info("finished %d of %d rounds; run directory %s", result.rounds_done, result.total_rounds, result.run_dir)
