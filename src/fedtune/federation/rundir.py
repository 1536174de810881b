"""The run directory: its names, its lock, and the checks that create, reopen, rewind and
finish one. Both engines (in-process, Flower), ``compare``, ``eval`` and the CLI use these.

Layout of one run::

    config.yaml       the resolved config, written before round 1 (rewritten on resume)
    metrics.jsonl     one JSON line per fit/eval/round/... (reporting/metrics.py)
    partition.json    the split: row ids per client and held out
    checkpoints/      round_NNNNN/ and LATEST (federation/checkpoint.py)
    client_state/     per-client state across rounds (federation/client_state.py)
    adapter/          the final adapter (PEFT); present exactly when the run finished its rounds
    eval.png  report.html  evaluations/   (evaluations/harness.json, harness.md: `fedtune bench`)
    trackers.json  tensorboard/  mlruns/  wandb/   output.trackers (reporting/trackers.py)
    .fedtune.lock     while a process holds the run: an OS lock, with the holder's pid inside

Lives in ``federation/`` because it is the engines' contract (DESIGN.md, "one federation,
two transports"); it imports only config, errors and the checkpoint/metrics formats, so
the evaluation and reporting layers can import it too. Names owned by a file-format module
(``METRICS_FILE``, ``CHECKPOINTS``, ``CLIENT_STATE``) are defined beside the code that reads
and writes them and re-exported here; everything else imports run-directory names from here.

The lock (``lock_run_dir``) is ``fcntl.flock`` on ``.fedtune.lock``: the kernel drops it when
the holder exits, however it exits (kill -9 included), so a stale pid in the file never
blocks anyone. It is taken before the first check and held until the run returns; a second
run or resume of the same directory is refused at once, naming the holder's pid.

Deleting: ``output.overwrite=true`` replaces only an earlier fedtune run (a folder with
``config.yaml``) or an empty folder, and only once the lock is held and every check passed;
any other non-empty folder is refused, never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from safetensors import SafetensorError

from fedtune.config import RunConfig, config_hash, dump_yaml, load_config, resume_differences
from fedtune.errors import CheckpointError, ConfigError, FedtuneError
from fedtune.federation.checkpoint import CHECKPOINTS, LATEST, Checkpoint, checkpoint_dir, kept_rounds, latest_checkpoint, load_checkpoint
from fedtune.federation.client_state import CLIENT_STATE
from fedtune.model.lora import save_adapter
from fedtune.reporting.metrics import METRICS_FILE, read_metrics

__all__ = [
    "CONFIG_FILE", "METRICS_FILE", "PARTITION_FILE", "CHECKPOINTS", "CLIENT_STATE", "FINAL_ADAPTER", "REPORT_FILE",
    "EVALUATIONS", "HARNESS_FILE", "HARNESS_TABLE", "TRACKERS_FILE", "TENSORBOARD_DIR", "MLFLOW_DIR",
    "WANDB_DIR", "COMPARISON_FILE", "LOCK_FILE", "RunResult", "RunLock", "lock_run_dir", "check_run_dir",
    "write_run_dir", "save_final_adapter", "finished_adapter", "storage_errors", "write_atomic",
]

CONFIG_FILE = "config.yaml"
PARTITION_FILE = "partition.json"
FINAL_ADAPTER = "adapter"
REPORT_FILE = "report.html"
EVALUATIONS = "evaluations"
HARNESS_FILE = "harness.json"  # in EVALUATIONS: lm-evaluation-harness results, base vs adapter
HARNESS_TABLE = "harness.md"  # in EVALUATIONS: the same as a Markdown table
TRACKERS_FILE = "trackers.json"  # the experiment trackers' run ids, so a resumed run appends to the same run
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
WANDB_DIR = "wandb"
COMPARISON_FILE = "comparison.json"
LOCK_FILE = ".fedtune.lock"

# errnos that mean "the disk could not take the write": reported as one line, the checkpoint intact
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


@dataclass
class RunResult:
    run_dir: Path
    rounds_done: int
    total_rounds: int
    last_round: Optional[int] = None  # the privacy budget's last round, when it ends the run early
    initial_eval: Optional[dict] = None
    final_eval: Optional[dict] = None
    samples_before: list[dict] = field(default_factory=list)
    samples_after: list[dict] = field(default_factory=list)
    report: Optional[Path] = None  # report.html, when one was written

    @property
    def finished(self) -> bool:
        return self.rounds_done >= (self.total_rounds if self.last_round is None else min(self.total_rounds, self.last_round))


# ----------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive OS lock on a run directory (see the module docstring); a context manager."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_FILE
        self.fd: Optional[int] = None
        self.created = False  # the folder did not exist: removed again on release if nothing was written

    def acquire(self) -> "RunLock":
        for _ in range(10):  # retried only when a releasing holder removed the file under us
            self.created = self.created or not self.run_dir.exists()
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue
            except OSError as err:
                if err.errno in STORAGE_ERRNOS:
                    raise
                raise CheckpointError(f"{self.run_dir}: cannot create or lock it ({err.strerror}); choose another output.dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(
                    f"{self.run_dir} is in use by another fedtune process (pid {holder}); wait for it to end or "
                    "choose another output.dir"
                ) from None
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)  # we locked a file its holder had just unlinked: take the new one
        raise CheckpointError(f"{self.path}: could not take the run directory's lock; try again")

    def release(self) -> None:
        """Remove the lock file (still holding it, so no one can lock the old inode unnoticed),
        and the folder when this run created it and wrote nothing, then let go."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
            if self.created and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: Path) -> RunLock:
    """``with lock_run_dir(d):`` holds ``d`` for this process (CheckpointError if another does)."""
    return RunLock(run_dir)


def is_run_dir(path: Path) -> bool:
    """A folder fedtune wrote: its config.yaml is a fedtune config and it has metrics.jsonl or
    checkpoints/ (a run that failed before its first write leaves nothing behind). Anything
    else (another tool's config.yaml beside a user's files) is never deleted by overwrite."""
    if not (path / CONFIG_FILE).is_file() or not ((path / METRICS_FILE).is_file() or (path / CHECKPOINTS).is_dir()):
        return False
    try:
        load_config(path / CONFIG_FILE)
    except FedtuneError:
        return False
    return True


def _entries(run_dir: Path) -> list[Path]:
    """What the folder holds, besides the lock."""
    return [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []


# ----------------------------------------------------------------------------- checks


def check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, from_round: Optional[int] = None) -> Optional[Checkpoint]:
    """Refuse to clobber an existing run, or check that ``run_dir`` can be resumed with ``cfg``
    (from its newest checkpoint, or the checkpoint of ``from_round``). Writes nothing; call it
    with the lock held. Returns the checkpoint to resume from (None for a new run)."""
    if not resume:
        if _entries(run_dir) and not cfg.output.overwrite:
            raise ConfigError(
                f"output.dir: {run_dir} already holds files; resume it with `fedtune run --resume {run_dir}`, "
                "or set output.overwrite=true or another output.dir"
            )
        if _entries(run_dir) and not is_run_dir(run_dir):
            raise ConfigError(
                f"output.dir: {run_dir} holds files but is not a fedtune run directory (a fedtune {CONFIG_FILE} with "
                f"{METRICS_FILE} or {CHECKPOINTS}/); output.overwrite only replaces runs: choose another output.dir or empty it"
            )
        return None
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{run_dir} is not a fedtune run directory (no {CONFIG_FILE}); check the path")
    diffs = resume_differences(load_config(run_dir / CONFIG_FILE), cfg)
    if diffs:
        raise CheckpointError(f"cannot resume {run_dir}: config differs in {'; '.join(diffs)}; drop those overrides or start a new run")
    ckpt = _open_checkpoint(run_dir, from_round)
    if ckpt.config_hash != config_hash(cfg):
        raise CheckpointError(f"{run_dir}: the checkpoint was written under a different config; start a new run")
    lines = sum(1 for _ in read_metrics(run_dir / METRICS_FILE)) if (run_dir / METRICS_FILE).is_file() else 0
    if lines < ckpt.metrics_lines:
        raise CheckpointError(
            f"{run_dir / METRICS_FILE} has {lines} lines but the checkpoint of round {ckpt.round} covers {ckpt.metrics_lines} "
            f"(truncated or deleted: the run's history is gone); restore the file{_older_hint(run_dir, ckpt.round, lines)}"
        )
    if ckpt.round > cfg.federation.rounds:
        raise CheckpointError(
            f"{run_dir}: the checkpoint is of round {ckpt.round}, beyond federation.rounds={cfg.federation.rounds}; "
            f"raise federation.rounds or pick an earlier one with --from-round (kept: {_kept(run_dir)})"
        )
    if ckpt.round == cfg.federation.rounds and from_round is None and finished_adapter(run_dir) is not None:
        raise CheckpointError(f"{run_dir} already finished {ckpt.round} rounds; raise federation.rounds to continue it")
    return ckpt


def _kept(run_dir: Path) -> str:
    return ", ".join(map(str, kept_rounds(run_dir))) or "none"


def _open_checkpoint(run_dir: Path, from_round: Optional[int]) -> Checkpoint:
    """The newest checkpoint (or that of ``from_round``), with advice naming the kept rounds."""
    hint = f"resume from a kept one with `fedtune run --resume {run_dir} --from-round N` (kept: {_kept(run_dir)})"
    if from_round is not None:
        if from_round not in kept_rounds(run_dir):
            raise CheckpointError(f"{run_dir} keeps no checkpoint of round {from_round}; {hint}")
        path = checkpoint_dir(run_dir, from_round)
    else:
        try:
            path = latest_checkpoint(run_dir)
        except CheckpointError as err:
            if not kept_rounds(run_dir):
                raise
            raise CheckpointError(f"{err}; {hint}") from None
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        others = [r for r in kept_rounds(run_dir) if checkpoint_dir(run_dir, r) != path]
        if not others:
            raise
        raise CheckpointError(f"{err}; {hint}") from None


def _older_hint(run_dir: Path, newer_than: int, lines: int) -> str:
    """', or resume from round K ...' for the newest older checkpoint that ``lines`` lines cover."""
    for r in reversed([r for r in kept_rounds(run_dir) if r < newer_than]):
        with contextlib.suppress(CheckpointError):
            if load_checkpoint(checkpoint_dir(run_dir, r)).metrics_lines <= lines:
                return f", or resume from round {r}, which it covers: `fedtune run --resume {run_dir} --from-round {r}`"
    return " or start a new run"


# ----------------------------------------------------------------------------- writing


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of its own (mkstemp, beside ``path``):
    a crash or full disk leaves the old file, and processes writing the same path at once
    (a shared cache, nodes sharing a folder) never rename each other's half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_run_dir(cfg: RunConfig, run_dir: Path, ckpt: Optional[Checkpoint]) -> None:
    """Lay out a new run (clearing an earlier run with output.overwrite; checked before) and
    write the resolved config; on resume from ``ckpt``, drop what came after it (newer
    checkpoints, and the final adapter when rounds remain) and rewrite the config (rounds may
    have grown). Call with the lock held and after ``check_run_dir``."""
    if ckpt is None:
        for entry in _entries(run_dir):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    else:
        _rewind(run_dir, ckpt.round, ckpt.round < cfg.federation.rounds)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CONFIG_FILE, dump_yaml(cfg))


def _rewind(run_dir: Path, round: int, rounds_remain: bool) -> None:
    """Make the checkpoint of ``round`` the newest: LATEST points at it, newer ones go."""
    root = run_dir / CHECKPOINTS
    write_atomic(root / LATEST, checkpoint_dir(run_dir, round).name)
    for r in kept_rounds(run_dir):
        if r > round:
            shutil.rmtree(checkpoint_dir(run_dir, r))
    if rounds_remain and (run_dir / FINAL_ADAPTER).exists():
        shutil.rmtree(run_dir / FINAL_ADAPTER)  # present exactly when the run has finished its rounds


def save_final_adapter(run_dir: Path, adapter, peft_config, extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``adapter/`` through a temporary folder, so it exists only when complete;
    ``extra(folder)`` adds to it before (the tokenizer and model card: federation/sharing.py)."""
    final, tmp = run_dir / FINAL_ADAPTER, run_dir / f".{FINAL_ADAPTER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(tmp, adapter, peft_config)
    if extra is not None:
        extra(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def finished_adapter(run_dir: Path) -> Optional[Path]:
    """A finished run's ``adapter/`` folder (None while the run has not finished)."""
    folder = Path(run_dir) / FINAL_ADAPTER
    return folder if folder.is_dir() else None


def _safetensors_errno(err: Exception) -> Optional[int]:
    """The OS error code inside a safetensors write error (its Rust ``Os { code: 28, ... }``)."""
    found = re.search(r"code: (\d+)", str(err))
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def storage_errors(run_dir: Path) -> Iterator[None]:
    """Turn a full (or read-only, or failing) disk under a run into one CheckpointError line
    naming the path and the fix. Checkpoints and config are written atomically, so the last
    checkpoint is intact whatever write failed."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        code = err.errno if isinstance(err, OSError) else _safetensors_errno(err)
        if code not in STORAGE_ERRNOS:
            raise
        where = getattr(err, "filename", None) or run_dir
        reason = err.strerror if isinstance(err, OSError) and err.strerror else os.strerror(code)
        if (run_dir / CHECKPOINTS / LATEST).is_file():
            fix = f"free space (or fix the disk) and resume with `fedtune run --resume {run_dir}`; the last checkpoint is intact"
        else:
            fix = "free space (or fix the disk) and start it again with output.overwrite=true"
        raise CheckpointError(f"{where}: {reason} while writing the run; {fix}") from None
