"""``federation.engine=flower`` under ``fedtune run``: Flower's simulation runtime.

The fedtune ServerApp runs in a thread of this process (so progress, Ctrl-C and the result
work as in-process); each of the ``partition.num_clients`` virtual SuperNodes runs the fedtune
ClientApp on Ray, in actors that reserve ``flower.client_cpus`` cores and
``flower.client_gpus`` GPUs each. Actors live for the whole run, so each loads the base model
once; as many clients train at once as the machine has room for actors. The virtual nodes
keep their client state (federation/flower/node_state.py) in ``<run dir>/node_state``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

from fedtune.config import RunConfig
from fedtune.errors import FederationError
from fedtune.federation.flower.runconfig import run_config_of
from fedtune.federation.rundir import RunResult, check_run_dir, lock_run_dir, storage_errors
from fedtune.reporting.progress import Progress

NODE_STATE = "node_state"  # the simulated nodes' state-dir, in the run directory


def backend_config(cfg: RunConfig) -> dict:
    """Ray backend settings: resources per ClientApp, and whether actors' output is shown."""
    return {
        "client_resources": {"num_cpus": cfg.flower.client_cpus, "num_gpus": cfg.flower.client_gpus},
        "init_args": {"log_to_driver": cfg.flower.client_logs},
    }


def run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    from_round: Optional[int] = None,
    progress: Optional[Progress] = None,
    stop: Optional[threading.Event] = None,
) -> RunResult:
    """Run (or resume) the federation ``cfg`` describes on Flower's simulation runtime."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation  # deprecated in flwr 1.41 for `flwr run`; kept for its in-process ServerApp

    from fedtune.federation.flower.client_app import make_client_app
    from fedtune.federation.flower.runconfig import CONFIG_KEY
    from fedtune.federation.flower.server_app import serve

    run_dir = Path(cfg.output.dir)
    result: dict[str, object] = {}
    server = ServerApp()
    with storage_errors(run_dir), lock_run_dir(run_dir) as lock:  # held here, passed to the ServerApp thread
        check_run_dir(cfg, run_dir, resume or from_round is not None, from_round)  # fail before Ray starts, not after

        @server.main()
        def main(grid, context) -> None:
            try:
                result["run"] = serve(grid, cfg, resume=resume, from_round=from_round, progress=progress or Progress(),
                                      stop=stop, lock=lock)
            except BaseException as err:  # raised here, after the simulation has shut down (not logged away by Flower)
                result["error"] = err

        client = make_client_app(run_config_of(cfg)[CONFIG_KEY], state_dir=str(run_dir / NODE_STATE))
        run_simulation(server, client, num_supernodes=cfg.partition.num_clients, backend_config=backend_config(cfg))
    if "error" in result:
        raise result["error"]
    if "run" not in result:
        raise FederationError(f"the Flower simulation of {run_dir} ended without finishing its ServerApp; see the log above")
    return result["run"]
