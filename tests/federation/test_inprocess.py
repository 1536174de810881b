import json
import threading

import pytest
import torch

from fedtune.config import load_config
from fedtune.errors import CheckpointError, ConfigError
from fedtune.federation import setup
from fedtune.federation.checkpoint import latest_checkpoint, load_checkpoint
from fedtune.federation.inprocess import run
from fedtune.model.lora import load_adapter
from fedtune.reporting.progress import Progress
from tests.run_records import records
from tests.tolerance import FORWARD, adapters_close, numbers_close


def test_run_writes_a_self_describing_directory(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    result = run(cfg)
    d = result.run_dir
    assert result.finished and result.rounds_done == 3
    for name in ("config.yaml", "partition.json", "metrics.jsonl", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (d / name).is_file(), name
    assert load_config(d / "config.yaml") == cfg  # the resolved config is saved
    part = json.loads((d / "partition.json").read_text())
    assert len(part["clients"]) == 4 and part["method"] == "shards"
    fits = records(d, "fit")
    assert len(fits) == 3 * 2 and all(f["steps"] == 3 for f in fits)
    evals = records(d, "eval")
    assert [e["round"] for e in evals] == [0, 1, 2, 3]
    assert set(evals[0]["per_category"]) == set(evals[-1]["per_category"]) and len(evals[0]["per_category"]) == 10
    assert evals[-1]["loss"] < evals[0]["loss"]  # training on the task lowers held-out loss
    samples = records(d, "samples")
    assert [s["round"] for s in samples] == [0, 3] and len(result.samples_after) == 1
    # the sample is a held-out row of the category whose held-out loss fell most, answered before and after
    change = {c: evals[-1]["per_category"][c]["loss"] - v["loss"] for c, v in evals[0]["per_category"].items()}
    most = min(change, key=lambda c: (change[c], c))
    (before,), (after,) = samples[0]["items"], samples[1]["items"]
    assert before["category"] == after["category"] == most and after["loss_change"] == pytest.approx(change[most], rel=1e-9)
    examples = setup.load_data(cfg)[0]
    assert before["prompt"] == after["prompt"] == next(examples[i].instruction for i in part["holdout"] if examples[i].category == most)
    final, _ = load_adapter(d / "adapter")
    ckpt = load_checkpoint(latest_checkpoint(d))
    assert ckpt.round == 3 and all(torch.equal(final[k], ckpt.adapter[k]) for k in final)


def test_same_config_same_schedule_and_adapter(tiny_overrides, tmp_path):
    a = run(load_config(None, tiny_overrides))
    b = run(load_config(None, tiny_overrides + [f"output.dir={tmp_path / 'again'}"]))
    assert [r["clients"] for r in records(a.run_dir, "round")] == [r["clients"] for r in records(b.run_dir, "round")]
    fa, _ = load_adapter(a.run_dir / "adapter")
    fb, _ = load_adapter(b.run_dir / "adapter")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


class StopAfter(Progress):
    """Presses Ctrl-C (sets the stop event) during round ``n``."""

    def __init__(self, stop, n):
        self.stop, self.n = stop, n

    def round_started(self, round, clients):
        if round == self.n:
            self.stop.set()


def test_resume_equals_uninterrupted(tiny_overrides, tmp_path):
    straight = run(load_config(None, tiny_overrides + [f"output.dir={tmp_path / 'straight'}"]))

    stop = threading.Event()
    cut = load_config(None, tiny_overrides + [f"output.dir={tmp_path / 'cut'}"])
    first = run(cut, progress=StopAfter(stop, 2), stop=stop)
    assert first.rounds_done == 2 and not first.finished
    assert not (first.run_dir / "adapter").exists()
    resumed = run(cut, resume=True)
    assert resumed.finished and resumed.rounds_done == 3

    fa, _ = load_adapter(straight.run_dir / "adapter")
    fb, _ = load_adapter(resumed.run_dir / "adapter")
    assert adapters_close(fa, fb)
    rounds = lambda r: [(x["round"], x["clients"]) for x in records(r.run_dir, "round")]  # noqa: E731
    assert rounds(straight) == rounds(resumed)
    evals = lambda r: [(x["round"], x["loss"]) for x in records(r.run_dir, "eval")]  # noqa: E731
    assert [r for r, _ in evals(straight)] == [r for r, _ in evals(resumed)]
    assert all(numbers_close(a, b, FORWARD) for (_, a), (_, b) in zip(evals(straight), evals(resumed)))
    assert len(records(resumed.run_dir, "fit")) == len(records(straight.run_dir, "fit"))


def test_resume_with_changed_config_says_what_differs(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=1"])
    run(cfg)
    changed = load_config(None, tiny_overrides + ["federation.rounds=2", "lora.r=4"])
    with pytest.raises(CheckpointError, match=r"config differs in lora.r \(run: 8, now: 4\)"):
        run(changed, resume=True)
    with pytest.raises(CheckpointError, match="already finished 1 rounds; raise federation.rounds"):
        run(cfg, resume=True)
    extended = run(load_config(None, tiny_overrides + ["federation.rounds=2"]), resume=True)
    assert extended.finished and extended.rounds_done == 2


def test_refuses_to_clobber_a_run(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=1"])
    run(cfg)
    with pytest.raises(ConfigError, match="already holds files; resume it with"):
        run(cfg)
    assert run(load_config(None, tiny_overrides + ["federation.rounds=1", "output.overwrite=true"])).finished


def test_corrupt_checkpoint_is_refused_on_resume(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["federation.rounds=2"])
    stop = threading.Event()
    r = run(cfg, progress=StopAfter(stop, 1), stop=stop)
    path = latest_checkpoint(r.run_dir)
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="does not match its recorded hash"):
        run(cfg, resume=True)


def test_init_adapter_from_a_run(tiny_overrides, tmp_path):
    first = run(load_config(None, tiny_overrides + ["federation.rounds=1"]))
    second = run(load_config(None, tiny_overrides + ["federation.rounds=1", f"model.init_adapter={first.run_dir}", f"output.dir={tmp_path / 'b'}"]))
    assert second.initial_eval["loss"] == pytest.approx(first.final_eval["loss"], rel=1e-5)


def test_bf16_autocast_run(tiny_overrides, tmp_path):
    """train.precision=bf16 (what precision=auto picks on AVX512-BF16/AMX CPUs and CUDA) trains
    and evaluates end to end on any CPU: finite fp32 adapter, held-out loss falls, and it is the
    same federation as fp32 up to bf16 rounding (the other tests pin fp32; see conftest.py)."""
    fp32 = run(load_config(None, tiny_overrides))
    bf16 = run(load_config(None, tiny_overrides + ["train.precision=bf16", f"output.dir={tmp_path / 'bf16'}"]))
    a, _ = load_adapter(fp32.run_dir / "adapter")
    b, _ = load_adapter(bf16.run_dir / "adapter")
    assert all(b[k].dtype == torch.float32 and torch.isfinite(b[k]).all() for k in b)
    evals = records(bf16.run_dir, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert numbers_close(evals[0]["loss"], records(fp32.run_dir, "eval")[0]["loss"], 1e-2)  # bf16 keeps ~3 digits
    assert [r["clients"] for r in records(bf16.run_dir, "round")] == [r["clients"] for r in records(fp32.run_dir, "round")]
    assert adapters_close(a, b, rel=0.5)  # the same direction of travel, not a different run


class Recorder(Progress):
    """Records the events the CLI's progress display is driven by."""

    def __init__(self):
        self.events = []

    def run_started(self, total_rounds, done_rounds, total_steps, pending=None):
        self.events.append(("run", total_steps, dict(pending or {})))

    def client_started(self, round, client, steps):
        self.events.append(("client", round, client, steps))

    def step(self, step, steps, loss):
        self.events.append(("step", step, steps))

    def phase_started(self, name, total):
        self.events.append(("phase", name, total))

    def phase_advanced(self, name, n):
        self.events.append(("advance", name, n))

    def phase_finished(self, name, seconds):
        self.events.append(("done", name))

    def named(self, kind):
        return [e for e in self.events if e[0] == kind]


def test_progress_sees_every_phase_and_each_clients_own_step_count(tiny_overrides):
    # Arrange: clients do different work per round; evaluations after rounds 2 and 3 (the last)
    cfg = load_config(None, tiny_overrides + ["train.local_steps_per_client=[1,4]", "eval.every=2"])
    progress = Recorder()

    # Act
    result = run(cfg, progress=progress)

    # Assert: loading, tokenising, the round-0 and two later evaluations, then the samples (picked by the loss
    # change, so after training) answered before and after, in shared batches (one phase of both answers)
    phases = [name for _, name, _ in progress.named("phase")]
    assert phases == ["loading model", "tokenising", "evaluation", "evaluation", "evaluation", "sample answers"]
    assert progress.named("phase")[-1][2] == 2 * cfg.eval.num_samples
    assert len(progress.named("done")) == len(phases)
    batches = progress.named("phase")[2][2]
    assert batches >= 1 and sum(n for _, name, n in progress.named("advance") if name == "evaluation") == 3 * batches
    # the ETA knows the evaluations and final answers to come, and every step
    fits = records(result.run_dir, "fit")
    (started,) = progress.named("run")
    assert started[1] == sum(f["steps"] for f in fits) and started[2] == {"evaluation": 2, "sample answers": 1}
    # each client's bar counts that client's steps
    told = {(r, c): steps for _, r, c, steps in progress.named("client")}
    assert told == {(f["round"], f["client"]): f["steps"] for f in fits} and len(set(told.values())) > 1
    steps_of = [e[2] for e in progress.events if e[0] == "step"]
    assert steps_of == [f["steps"] for f in fits for _ in range(f["steps"])]
