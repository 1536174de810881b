"""RichProgress: per-client step bars, an ETA that counts evaluations, plain lines off a terminal."""

import io

import pytest
from rich.console import Console

from fedtune.reporting.progress import EVALUATION, SAMPLES, Progress, RichProgress, eta_seconds, format_eta


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def terminal():
    return Console(file=io.StringIO(), force_terminal=True, width=120)


def test_eta_is_steps_at_their_pace_plus_pending_phases_at_theirs():
    assert eta_seconds(3, 2.0, {EVALUATION: 2, SAMPLES: 1}, {EVALUATION: 10.0, SAMPLES: 4.0}) == 3 * 2.0 + 2 * 10.0 + 4.0
    assert eta_seconds(0, None, {EVALUATION: 1}, {EVALUATION: 7.0}) == 7.0
    assert eta_seconds(5, None, {}, {}) is None  # no step timed yet
    assert eta_seconds(1, 1.0, {EVALUATION: 3}, {}) == 1.0  # evaluations not measured yet count 0
    assert format_eta(None) == "ETA -:--" and format_eta(75) == "ETA 1:15" and format_eta(3725) == "ETA 1:02:05"


def test_the_run_eta_includes_the_evaluations_still_to_come():
    # Arrange: round 0's evaluation took 10 s and its sample answers 4 s (as measured by the phases)
    clock = Clock()
    p = RichProgress(terminal(), clock=clock)
    p.phase_started(EVALUATION, 3)
    p.phase_finished(EVALUATION, 10.0)
    p.phase_started(SAMPLES, 1)
    p.phase_finished(SAMPLES, 4.0)

    # Act: 3 rounds of 2 steps each, an evaluation after every round, samples at the end; one step takes 2 s
    p.run_started(3, 0, 6, {EVALUATION: 3, SAMPLES: 1})
    p.round_started(1, [0])
    p.client_started(1, 0, 2)
    clock.now += 2.0
    p.step(1, 2, 1.0)

    # Assert
    assert p.eta() == pytest.approx(5 * 2.0 + 3 * 10.0 + 4.0)
    assert "ETA 0:44" in p.bars.tasks[0].fields["eta"]
    clock.now += 2.0
    p.step(2, 2, 1.0)
    p.phase_started(EVALUATION, 3)
    p.phase_finished(EVALUATION, 20.0)  # one fewer to come; the mean is now 15 s
    assert p.eta() == pytest.approx(4 * 2.0 + 2 * 15.0 + 4.0)
    p.run_finished()
    assert not p.bars.tasks and not p.bars.live.is_started


def test_the_client_bar_counts_that_clients_steps():
    p = RichProgress(terminal())
    p.run_started(2, 0, 6)  # 6 steps in the run: a 2-step and a 4-step client
    p.client_started(1, 0, 2)
    p.step(1, 2, 1.0)
    p.step(2, 2, 1.0)
    bar = next(t for t in p.bars.tasks if t.description == "client 0")
    assert (bar.completed, bar.total) == (2, 2)
    p.client_started(1, 1, 4)
    bar = next(t for t in p.bars.tasks if t.description == "client 1")
    assert (bar.completed, bar.total) == (0, 4)
    p.run_finished()


def test_phases_show_a_bar_on_a_terminal_and_go_away():
    p = RichProgress(terminal())
    with p.phase("held-out loss", 3) as shown:
        shown.advance()
        shown.advance(2)
        (task,) = p.bars.tasks
        assert (task.description, task.completed, task.total) == ("held-out loss", 3, 3)
        with p.phase("loading model"):  # nested, length unknown: a spinner
            assert len(p.bars.tasks) == 2 and p.bars.tasks[1].total is None
    assert not p.bars.tasks and not p.bars.live.is_started


def test_off_a_terminal_phases_and_rounds_are_plain_lines():
    # Arrange: a pipe or CI log
    console = Console(file=io.StringIO(), width=120, log_path=False)
    p = RichProgress(console)

    # Act
    with p.phase(EVALUATION, 2) as shown:
        with p.phase("inner"):  # only the outer phase is announced
            shown.advance(2)
    p.run_started(1, 0, 1, {EVALUATION: 1})
    p.client_started(1, 0, 1)
    p.step(1, 1, 0.5)
    p.round_finished(1, 3.0)
    p.run_finished()

    # Assert
    text = console.file.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no redrawing, no cursor control
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    assert lines[0].endswith("evaluation ...") and "evaluation done in" in lines[1] and len(lines) == 3
    assert "round 1 done in 3.0s; ETA" in lines[2]


def test_the_base_progress_times_phases_and_ignores_events():
    seen = []

    class Recorder(Progress):
        def phase_finished(self, name, seconds):
            seen.append((name, seconds >= 0))

    with pytest.raises(ValueError):
        with Recorder().phase("x", 2) as shown:
            shown.advance()
            raise ValueError
    assert seen == [("x", True)]  # finished even when the body raises


def test_federated_line_names_loss_examples_clients_and_failures():
    from fedtune.reporting.progress import federated_line

    sft = {"loss": 2.5, "ppl": 12.18, "examples": 7, "clients": [0, 3], "failed": [{"client": 1, "reason": "x"}]}
    assert federated_line(sft) == "federated evaluation: loss 2.5000, perplexity 12.18 on 7 examples of 2 clients, 1 failed"
    dpo = {"loss": 0.5, "reward_accuracy": 0.75, "margin": 0.125, "examples": 4, "clients": [1], "failed": []}
    assert "reward accuracy 0.750, margin 0.1250 on 4 examples of 1 clients" in federated_line(dpo)
    assert "no held-out rows scored" in federated_line({"examples": 0, "clients": [], "failed": []})
