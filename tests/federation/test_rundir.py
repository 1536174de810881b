"""The run directory: lock, resume checks, --from-round, finishing, disk errors."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from fedtune.config import load_config
from fedtune.errors import CheckpointError, ConfigError
from fedtune.federation.checkpoint import kept_rounds, load_checkpoint
from fedtune.federation.inprocess import run
from fedtune.federation.rundir import LOCK_FILE, lock_run_dir
from fedtune.model.lora import load_adapter
from fedtune.reporting.metrics import MetricsLog
from fedtune.reporting.progress import Progress
from tests.federation.test_inprocess import StopAfter, records
from tests.tolerance import adapters_close as close

HOLDER = "import sys, time; from fedtune.federation.rundir import lock_run_dir; l = lock_run_dir(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)"



def test_lock_names_the_holder_and_dies_with_it(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"in use by another fedtune process \(pid {holder.pid}\)"):
            lock_run_dir(run_dir).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: the kernel drops the lock
        holder.wait()
    with lock_run_dir(run_dir):
        assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert list(run_dir.iterdir()) == []  # the lock file goes with its holder (a killed one's stays until then)
    with lock_run_dir(tmp_path / "fresh"):
        pass
    assert not (tmp_path / "fresh").exists()  # nothing was written: the folder the lock created is gone again


class Intruder(Progress):
    """During round 1, a second `fedtune run` and `--resume` of the same directory in real processes."""

    def __init__(self, overrides, run_dir):
        self.overrides, self.run_dir, self.procs = overrides, run_dir, []

    def round_started(self, round, clients):
        if round == 1:
            for args in (self.overrides, ["--resume", str(self.run_dir)]):
                self.procs.append(subprocess.run([sys.executable, "-m", "fedtune.cli", "run", *args], capture_output=True,
                                                 text=True, timeout=300))


def test_a_running_run_refuses_a_second_run_and_resume(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=1"])
    intruder = Intruder(tiny_overrides + ["federation.rounds=4", "lora.r=4"], tmp_path / "run")
    result = run(cfg, progress=intruder)
    assert result.finished
    for proc in intruder.procs:
        assert proc.returncode == 4, proc.stderr
        assert f"in use by another fedtune process (pid {os.getpid()})" in proc.stderr and "Traceback" not in proc.stderr
    assert load_config(result.run_dir / "config.yaml") == cfg  # the run's files are its own
    assert [r["round"] for r in records(result.run_dir, "round")] == [1]
    assert not (result.run_dir / LOCK_FILE).exists()


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tiny_overrides, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not a fedtune run directory"):
        run(load_config(None, tiny_overrides + ["output.overwrite=true"]))
    assert (tmp_path / "run" / "thesis.tex").read_text() == "precious"
    (tmp_path / "run" / "config.yaml").write_text("services: {}\n")  # another tool's config beside the user's files
    (tmp_path / "run" / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="not a fedtune run directory"):
        run(load_config(None, tiny_overrides + ["output.overwrite=true"]))
    assert (tmp_path / "run" / "thesis.tex").read_text() == "precious"


def test_resume_finishes_a_run_killed_before_its_adapter(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=2"])
    done = run(cfg)
    final, _ = load_adapter(done.run_dir / "adapter")
    shutil.rmtree(done.run_dir / "adapter")  # kill -9 after the last checkpoint, before adapter/
    later = load_config(None, tiny_overrides + ["federation.rounds=1", f"model.init_adapter={done.run_dir}", f"output.dir={tmp_path / 'b'}"])
    with pytest.raises(CheckpointError, match="has not finished.*`fedtune run --resume"):
        run(later)

    finished = run(cfg, resume=True)
    assert finished.finished and finished.rounds_done == 2 and finished.final_eval is not None
    assert close(load_adapter(done.run_dir / "adapter")[0], final)
    assert [s["round"] for s in records(done.run_dir, "samples")] == [0, 2]
    assert run(later).finished  # init_adapter now agrees: the run is finished
    with pytest.raises(CheckpointError, match="already finished 2 rounds"):
        run(cfg, resume=True)


def test_resume_refuses_a_metrics_file_shorter_than_its_checkpoint(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=2"])
    stop = threading.Event()
    first = run(cfg, progress=StopAfter(stop, 1), stop=stop)
    metrics = first.run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:4]))  # round 0's checkpoint covers 2 (data, eval; the samples come after training)
    with pytest.raises(CheckpointError, match=r"metrics.jsonl has 4 lines but the checkpoint of round 1 covers 6 .*--from-round 0`"):
        run(cfg, resume=True)
    metrics.unlink()
    with pytest.raises(CheckpointError, match="has 0 lines but the checkpoint of round 1"):
        run(cfg, resume=True)
    metrics.write_text("".join(lines))
    assert run(cfg, resume=True).finished


def test_from_round_equals_an_uninterrupted_run(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["output.keep_checkpoints=2"])
    done = run(cfg)
    straight, _ = load_adapter(done.run_dir / "adapter")
    straight_rounds = records(done.run_dir, "round")
    assert kept_rounds(done.run_dir) == [2, 3]
    with pytest.raises(CheckpointError, match=r"keeps no checkpoint of round 1.*--from-round N` \(kept: 2, 3\)"):
        run(cfg, from_round=1)

    again = run(cfg, from_round=2)
    assert again.finished and again.rounds_done == 3
    assert close(load_adapter(done.run_dir / "adapter")[0], straight)
    assert [(r["round"], r["clients"]) for r in records(done.run_dir, "round")] == [(r["round"], r["clients"]) for r in straight_rounds]
    assert [e["round"] for e in records(done.run_dir, "eval")] == [0, 1, 2, 3]
    assert load_checkpoint(done.run_dir / "checkpoints" / "round_00003").metrics_lines == len(
        (done.run_dir / "metrics.jsonl").read_text().splitlines()) - 2  # all but the samples (before, after), logged at the end


def test_missing_latest_points_at_from_round(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=2"])
    stop = threading.Event()
    first = run(cfg, progress=StopAfter(stop, 1), stop=stop)
    (first.run_dir / "checkpoints" / "LATEST").unlink()
    with pytest.raises(CheckpointError, match=r"LATEST is missing.*--from-round N` \(kept: 0, 1\)") as err:
        run(cfg, resume=True)
    assert "overwrite" not in str(err.value)
    assert run(cfg, resume=True, from_round=1).finished


def test_truncated_partition_file_is_one_error_and_rewinds_nothing(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=2", "output.keep_checkpoints=3"])
    stop = threading.Event()
    first = run(cfg, progress=StopAfter(stop, 1), stop=stop)
    part = first.run_dir / "partition.json"
    part.write_text(part.read_text()[:40])
    with pytest.raises(CheckpointError, match="partition.json is unreadable .*delete it and resume"):
        run(cfg, resume=True, from_round=0)
    assert kept_rounds(first.run_dir) == [0, 1]  # nothing rewound before the check
    part.unlink()
    assert run(cfg, resume=True).finished


def test_disk_full_is_one_error_with_the_checkpoint_intact(tiny_overrides, tmp_path, monkeypatch):
    straight = run(load_config(None, tiny_overrides + [f"output.dir={tmp_path / 'straight'}"]))
    cfg = load_config(None, tiny_overrides)
    real_log = MetricsLog.log

    def full(self, record):
        if record.get("round") == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_log(self, record)

    monkeypatch.setattr(MetricsLog, "log", full)
    with pytest.raises(CheckpointError, match=r"metrics.jsonl: No space left on device while writing the run; free space .* --resume"):
        run(cfg)
    monkeypatch.setattr(MetricsLog, "log", real_log)
    assert kept_rounds(cfg_dir := tmp_path / "run") == [0, 1] and not (cfg_dir / "adapter").exists()
    resumed = run(cfg, resume=True)
    assert resumed.finished and close(load_adapter(cfg_dir / "adapter")[0], load_adapter(straight.run_dir / "adapter")[0])


def test_disk_full_inside_a_safetensors_write_is_one_error(tiny_overrides, tmp_path, monkeypatch):
    """safetensors reports a full disk as a SafetensorError carrying the OS code, not an OSError."""
    import fedtune.model.lora as lora
    from safetensors import SafetensorError

    real_save = lora.save_file

    def full(tensors, path, *args, **kwargs):
        if "round_00002" in path or ".tmp-round_00002" in path:
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(lora, "save_file", full)
    cfg = load_config(None, tiny_overrides)
    with pytest.raises(CheckpointError, match=r"No space left on device while writing the run; free space .* --resume"):
        run(cfg)
    monkeypatch.setattr(lora, "save_file", real_save)
    assert kept_rounds(tmp_path / "run") == [0, 1]
    assert run(cfg, resume=True).finished


def test_evaluation_settings_may_change_on_resume(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=2"])
    stop = threading.Event()
    run(cfg, progress=StopAfter(stop, 1), stop=stop)
    more = load_config(None, tiny_overrides + ["federation.rounds=2", "eval.num_samples=2", "eval.every=2"])
    resumed = run(more, resume=True)
    assert resumed.finished and len(resumed.samples_before) == len(resumed.samples_after) == 2
    assert [b["prompt"] for b in resumed.samples_before] == [a["prompt"] for a in resumed.samples_after]
    assert json.loads((resumed.run_dir / "metrics.jsonl").read_text().splitlines()[-1])["type"] == "samples"


def test_an_output_dir_that_is_a_file_is_one_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file: cannot create or lock it .*choose another output.dir"):
        lock_run_dir(tmp_path / "file").acquire()
