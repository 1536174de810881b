"""A Flower deployment on this machine: one ``flower-superlink`` and a ``flower-supernode`` per
data owner, as real processes on 127.0.0.1 (free ports). For trying the deployment runtime,
the integration test and the overhead benchmark; real federations start the same commands
on their own machines (see the README).

Each SuperNode runs with ``--isolation process`` beside one ``fedtune flower worker`` that
runs all its ClientApp tasks in one long-lived process (node_worker.py), so the base model
and tokenised shard are loaded once per node, not once per message. ``warm=False`` starts the
SuperNodes with Flower's default instead (a new ``flwr-clientapp`` process per message).

Every process is started in its own session and stopped by pid, with the processes it
started (Flower's SuperExec and App processes), even when the run fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from fedtune.errors import FederationError
from fedtune.federation.flower.deploy import CONNECTION, FLOWER_ENV, flwr_command, write_connection


TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # flwr 1.41: seconds between SuperExec task polls (default 1)
TASK_POLL_SECONDS = "0.05"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config_arg(values: dict) -> str:
    """``--node-config`` text: ``key="string" key=123``."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


class LocalDeployment:
    """``with LocalDeployment(workdir, [{"data-path": ..., "client-id": 0}, ...]) as net:``
    starts the SuperLink and SuperNodes and waits until the SuperLink answers;
    ``net.superlink`` is its address. Logs go to ``workdir/*.log``.

    With ``certificates`` (a folder made by ``scripts/make-certs.sh``) everything runs over TLS;
    with ``authenticate`` too, the SuperLink admits only SuperNodes whose public key
    (``supernode-<i>.pub``) was registered, and SuperNode ``i`` signs with ``supernode-<i>``.
    """

    def __init__(
        self,
        workdir: Path,
        node_configs: Sequence[dict],
        *,
        certificates: Optional[Path] = None,
        authenticate: bool = False,
        env: Optional[dict] = None,
        warm: bool = True,
    ):
        if authenticate and certificates is None:
            raise FederationError("SuperNode authentication needs TLS: pass the certificates folder too")
        self.workdir, self.node_configs, self.certificates = Path(workdir), list(node_configs), certificates
        self.authenticate, self.warm = authenticate, warm
        bin_dir = str(Path(flwr_command()[0]).parent)  # Flower finds its helper commands on PATH
        self.env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.workdir / "flwr-home"),
                    "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), **(env or {})}
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[list[subprocess.Popen]] = []  # per SuperNode: it and its worker
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"

    def __enter__(self) -> "LocalDeployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        bin_dir = Path(flwr_command()[0]).parent
        link = [str(bin_dir / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation", *self.tls_server_args()]
        if self.authenticate:
            link.append("--enable-supernode-auth")
        self.spawn(link, "superlink")
        self.wait_for_superlink()
        # SuperNodes sharing this machine share its cores: without a cap each ClientApp's torch
        # would use them all, and oversubscribed threads train several times slower.
        # (An OMP_NUM_THREADS already set wins.)
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, len(self.node_configs))))}
        threads.update({k: v for k, v in self.env.items() if k == "OMP_NUM_THREADS"})
        # Each SuperNode's SuperExec looks for a new task (a ClientApp to start) once a second
        # by default: on a local network every message would wait ~0.5 s more for nothing.
        threads[TASK_POLL_ENV] = self.env.get(TASK_POLL_ENV, TASK_POLL_SECONDS)
        for i, values in enumerate(self.node_configs):
            runtime_api = f"127.0.0.1:{free_port()}"
            node = [str(bin_dir / "flower-supernode"), "--superlink", self.superlink, "--port", runtime_api.rsplit(":", 1)[1],
                    "--node-config", node_config_arg(values), *self.tls_client_args()]
            if self.warm:
                node += ["--isolation", "process"]
            if self.authenticate:
                self.register(i)
                node += ["--auth-supernode-private-key", str(self.certificates / f"supernode-{i}")]
            self.nodes.append([self.spawn(node, f"supernode-{i}", threads)])
            if self.warm:  # the node's ClientApp process (it waits for the Runtime API to answer)
                worker = [sys.executable, "-m", "fedtune.cli", "flower", "worker", "--runtime-api", runtime_api]
                self.nodes[-1].append(self.spawn(worker, f"worker-{i}", threads))

    def register(self, i: int) -> None:
        """Register SuperNode ``i``'s public key with the SuperLink (``flwr supernode register``)."""
        write_connection(Path(self.env["FLWR_HOME"]), self.superlink, insecure=False, root_certificates=self.certificates / "ca.crt")
        key = self.certificates / f"supernode-{i}.pub"
        proc = subprocess.run([*flwr_command(), "supernode", "register", str(key), CONNECTION], env=self.env,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise FederationError(f"could not register {key} with the SuperLink: {(proc.stdout + proc.stderr).strip()}")

    def tls_server_args(self) -> list[str]:
        if self.certificates is None:
            return ["--insecure"]
        c = self.certificates
        return ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "superlink.crt"), "--ssl-keyfile", str(c / "superlink.key")]

    def tls_client_args(self) -> list[str]:
        return ["--insecure"] if self.certificates is None else ["--root-certificates", str(self.certificates / "ca.crt")]

    def spawn(self, command: list[str], name: str, env: Optional[dict] = None) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("w")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})}, start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait_for_superlink(self, timeout: float = 60.0) -> None:
        scheme = "http" if self.certificates is None else "https"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise FederationError(f"flower-superlink exited with code {self.procs[0].returncode}; see {self.workdir / 'superlink.log'}")
            try:
                context = None
                if self.certificates is not None:
                    import ssl

                    context = ssl.create_default_context(cafile=str(self.certificates / "ca.crt"))
                urllib.request.urlopen(f"{scheme}://{self.superlink}/health", timeout=1, context=context)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise FederationError(f"flower-superlink did not answer on {self.superlink} within {timeout:g}s")

    def kill_node(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Stop SuperNode ``index`` (a data owner going away), with its children and worker."""
        for proc in self.nodes[index]:
            _signal_tree(proc.pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process this deployment started, and their descendants, by pid."""
        pids = [pid for proc in self.procs for pid in (*_descendants(proc.pid), proc.pid)]
        for pid in pids:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()
        self.procs.clear()
        self.nodes.clear()


def _signal_tree(pid: int, sig: int) -> None:
    for p in (*_descendants(pid), pid):
        _kill(p, sig)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (from /proc; none where there is no /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
