"""Start a fedtune run on a Flower SuperLink: the Flower App and the ``flwr run`` around it.

A Flower App is a folder with a ``pyproject.toml`` naming the ServerApp and ClientApp;
``flwr run`` bundles it (a FAB) and sends it to the SuperLink, which starts the ServerApp and
hands the ClientApp to every SuperNode. fedtune's app holds no code (the components live in
the installed ``fedtune`` package, which the SuperLink and SuperNode machines must have): its
only content is the resolved run config, validated here before anything is sent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import tomli_w

from fedtune import __version__
from fedtune.config import RunConfig, federated_eval
from fedtune.errors import ConfigError, FederationError
from fedtune.federation.flower.runconfig import run_config_of

APP_NAME = "fedtune-federation"
PUBLISHER = "fedtune"
SERVERAPP = "fedtune.federation.flower.server_app:app"
CLIENTAPP = "fedtune.federation.flower.client_app:app"
FLWR_REQUIREMENT = "flwr>=1.41,<1.42"
CONNECTION = "fedtune"
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
COMPLETED = "finished:completed"


def write_app(cfg: RunConfig, directory: Path, resume: bool = False) -> Path:
    """Write the Flower App for ``cfg`` into ``directory`` (its ``pyproject.toml``)."""
    if cfg.federation.engine != "flower":
        raise ConfigError("federation.engine: a Flower deployment needs federation.engine=flower")
    directory.mkdir(parents=True, exist_ok=True)
    project = {
        "name": APP_NAME,
        "version": __version__,
        "description": f"fedtune federation writing to {cfg.output.dir}",
        "license": "Apache-2.0",
        "dependencies": [FLWR_REQUIREMENT],
    }
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, federated=federated_eval(cfg, deployment=True)))  # auto, resolved
    flwr_app = {"publisher": PUBLISHER, "components": {"serverapp": SERVERAPP, "clientapp": CLIENTAPP}, "config": run_config_of(cfg, resume)}
    (directory / "pyproject.toml").write_text(tomli_w.dumps({"project": project, "tool": {"flwr": {"app": flwr_app}}}))
    return directory


def write_connection(flwr_home: Path, superlink: str, *, insecure: bool, root_certificates: Optional[Path]) -> None:
    """A Flower CLI config (``$FLWR_HOME/config.toml``) whose default connection is ``superlink``."""
    if not insecure and root_certificates is None:
        raise ConfigError("give the SuperLink's CA certificate (--root-certificates ca.crt), or --insecure for a local try-out")
    connection: dict = {"address": superlink}
    if insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).expanduser().resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))


def flwr_command() -> list[str]:
    """The ``flwr`` CLI of this Python environment."""
    beside = Path(sys.executable).with_name("flwr")
    found = str(beside) if beside.is_file() else shutil.which("flwr")
    if found is None:
        raise FederationError("the `flwr` command is not installed; pip install 'flwr[simulation]>=1.41,<1.42'")
    return [found]


def flwr_run(
    cfg: RunConfig,
    superlink: str,
    *,
    resume: bool = False,
    insecure: bool = False,
    root_certificates: Optional[Path] = None,
    echo: Callable[[str], None] = lambda line: None,
) -> dict:
    """Start the run on ``superlink`` (host:port), follow its log until it ends, and return
    its status record from ``flwr ls`` (``status`` is ``finished:completed`` on success).
    Each log line goes to ``echo``."""
    with tempfile.TemporaryDirectory(prefix="fedtune-flwr-") as tmp:
        app = write_app(cfg, Path(tmp) / "app", resume)
        home = Path(tmp) / "flwr-home"
        write_connection(home, superlink, insecure=insecure, root_certificates=root_certificates)
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home)}
        command = [*flwr_command(), "run", str(app), CONNECTION, "--stream"]
        run_id = None
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            try:
                for line in proc.stdout:
                    echo(line.rstrip("\n"))
                    found = re.search(r"Successfully started run (\d+)", line)
                    run_id = run_id or (found and int(found.group(1)))
            except KeyboardInterrupt:  # Ctrl-C: stop the run on the SuperLink too, not just the log
                proc.terminate()
                if run_id is not None:
                    subprocess.run([*flwr_command(), "stop", str(run_id), CONNECTION], env=env, capture_output=True, timeout=60)
                raise FederationError(
                    f"stopped run {run_id} on {superlink}; its last checkpoint is intact: continue it with --resume"
                ) from None
        if proc.returncode != 0 or run_id is None:
            raise FederationError(f"`flwr run` could not start the run on {superlink} (exit code {proc.returncode}); see its output above")
        return run_status(run_id, env)


def run_status(run_id: int, env: dict) -> dict:
    """The ``flwr ls`` record of one run."""
    proc = subprocess.run(
        [*flwr_command(), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    try:
        return json.loads(proc.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        raise FederationError(f"`flwr ls` gave no status for run {run_id}: {proc.stdout.strip() or proc.stderr.strip()}") from None
