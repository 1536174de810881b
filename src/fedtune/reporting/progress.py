"""Progress events of a run. The library calls a :class:`Progress`; it prints nothing itself.

:class:`Progress` ignores every event (library default, tests); :class:`RichProgress`, used by
the CLI, shows rounds, the client in training and its steps, loss, an ETA, and a spinner or bar
for every longer phase (model load, tokenisation, evaluation, generation, judge calls).

A phase is opened with ``with progress.phase(NAME, total) as p:`` and advanced with
``p.advance(n)``; ``total`` None means "unknown" (a spinner). The names below are the ones the
library uses; a run's ETA counts the phases still to come by name (``run_started(pending=...)``)
at the mean measured duration of earlier phases of that name.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Mapping, Optional, Sequence

LOADING = "loading model"
TOKENISING = "tokenising"
EVALUATION = "evaluation"  # a run's held-out evaluation (round 0, every eval.every rounds, the last)
FEDERATED_EVALUATION = "federated evaluation"  # clients scoring the adapter on their own held-out rows
SAMPLES = "sample answers"  # a run's answers to its sample prompts (before and after training)
HELDOUT = "held-out loss"
GENERATION = "generating answers"
REFERENCE = "reference log-probs"
JUDGING = "judge calls"
HARNESS = "harness tasks"  # lm-evaluation-harness on one model (a spinner: lm-eval runs its own loop)


class Phase:
    """A running phase: ``advance(n)`` reports ``n`` more units of its total done."""

    def __init__(self, progress: "Progress", name: str):
        self.progress, self.name = progress, name

    def advance(self, n: int = 1) -> None:
        self.progress.phase_advanced(self.name, n)


class Progress:
    """Receives run events; every method is optional to implement."""

    def run_started(self, total_rounds: int, done_rounds: int, total_steps: int,
                    pending: Optional[Mapping[str, int]] = None) -> None: ...
    def round_started(self, round: int, clients: Sequence[int]) -> None: ...
    def client_started(self, round: int, client: int, steps: int) -> None: ...
    def step(self, step: int, steps: int, loss: float) -> None: ...
    def client_finished(self, round: int, client: int, metrics: dict) -> None: ...
    def evaluated(self, round: int, result: dict) -> None: ...
    def federated_evaluated(self, round: int, result: dict) -> None: ...
    def round_finished(self, round: int, seconds: float) -> None: ...
    def message(self, text: str) -> None: ...
    def run_finished(self) -> None: ...
    def phase_started(self, name: str, total: Optional[int]) -> None: ...
    def phase_advanced(self, name: str, n: int) -> None: ...
    def phase_finished(self, name: str, seconds: float) -> None: ...

    @contextlib.contextmanager
    def phase(self, name: str, total: Optional[int] = None) -> Iterator[Phase]:
        """``phase_started``, then the body (which may ``advance``), then ``phase_finished``
        with the seconds it took (also when the body raises)."""
        self.phase_started(name, total)
        started = time.perf_counter()
        try:
            yield Phase(self, name)
        finally:
            self.phase_finished(name, time.perf_counter() - started)


def eta_seconds(steps_left: int, step_seconds: Optional[float], pending: Mapping[str, int],
                phase_seconds: Mapping[str, float]) -> Optional[float]:
    """Seconds a run has left: its steps at the mean step time plus every pending phase at the
    mean time of that phase so far (a phase not measured yet counts 0). None while steps are
    left but none has been timed."""
    if steps_left > 0 and step_seconds is None:
        return None
    phases = sum(n * phase_seconds.get(name, 0.0) for name, n in pending.items())
    return steps_left * (step_seconds or 0.0) + phases


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "ETA -:--"
    m, s = divmod(int(round(seconds)), 60)
    return f"ETA {m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"ETA {m}:{s:02d}"


class RichProgress(Progress):
    """On a terminal: live bars (rounds with an ETA; steps of the current client; one per open
    phase), removed when done. Elsewhere (a pipe, a CI log): plain lines, one when a phase
    starts and one when it ends, and a line per round with the ETA; no redrawing."""

    def __init__(self, console=None, clock: Callable[[], float] = time.perf_counter):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, SpinnerColumn, TextColumn, TimeElapsedColumn

        class Count(MofNCompleteColumn):  # nothing for a phase of unknown length
            def render(self, task):
                return super().render(task) if task.total is not None else ""

        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.bars = Bars(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), Count(), TextColumn("{task.fields[info]}"),
            TextColumn("{task.fields[eta]}"), TimeElapsedColumn(), console=self.console, transient=True,
        )
        self.clock = clock
        self.rounds_task: Optional[int] = None
        self.steps_task: Optional[int] = None
        self.phases: list[tuple[str, Optional[int]]] = []  # open phases (name, bar), innermost last
        self.phase_seconds: dict[str, list[float]] = {}  # finished phases' durations by name
        self.pending: dict[str, int] = {}  # phases the running run still has to do
        self.steps_left, self.step_time, self.steps_timed = 0, 0.0, 0
        self.mark: Optional[float] = None  # when the last step (or the client) started

    # ------------------------------------------------------------------ bars

    def _add(self, description: str, total: Optional[int], completed: int = 0) -> Optional[int]:
        if not self.live:
            return None
        self.bars.start()  # no-op when running
        return self.bars.add_task(description, total=total, completed=completed, info="", eta="")

    def _remove(self, task: Optional[int]) -> None:
        if task is None:
            return
        self.bars.remove_task(task)
        if not self.bars.tasks:
            self.bars.stop()

    # ------------------------------------------------------------------ a run

    def eta(self) -> Optional[float]:
        step = self.step_time / self.steps_timed if self.steps_timed else None
        means = {k: sum(v) / len(v) for k, v in self.phase_seconds.items() if v}
        return eta_seconds(self.steps_left, step, self.pending, means)

    def _show_eta(self) -> None:
        if self.rounds_task is not None:
            self.bars.update(self.rounds_task, eta=format_eta(self.eta()))

    def run_started(self, total_rounds: int, done_rounds: int, total_steps: int,
                    pending: Optional[Mapping[str, int]] = None) -> None:
        self.steps_left, self.pending = total_steps, dict(pending or {})
        self.rounds_task = self._add("rounds", total_rounds, done_rounds)
        self.steps_task = self._add("steps", None)
        self._show_eta()

    def round_started(self, round: int, clients: Sequence[int]) -> None:
        if self.rounds_task is not None:
            self.bars.update(self.rounds_task, description=f"round {round}", info=f"clients {list(clients)}")
            self._show_eta()

    def client_started(self, round: int, client: int, steps: int) -> None:
        self.mark = self.clock()
        if self.steps_task is not None:  # this client's steps, not the run's
            self.bars.reset(self.steps_task, total=max(steps, 1), completed=0, description=f"client {client}", info="", eta="")

    def step(self, step: int, steps: int, loss: float) -> None:
        now = self.clock()
        if self.mark is not None:
            self.step_time, self.steps_timed = self.step_time + now - self.mark, self.steps_timed + 1
        self.mark, self.steps_left = now, max(self.steps_left - 1, 0)
        if self.steps_task is not None:
            self.bars.update(self.steps_task, advance=1, info=f"loss {loss:.3f}")
            self._show_eta()

    def client_finished(self, round: int, client: int, metrics: dict) -> None:
        self.mark = None
        self.console.log(
            f"round {round} client {client}: loss {metrics['loss']:.4f}, {metrics['steps']} steps, "
            f"{metrics['tokens']} tokens, {metrics['seconds']:.1f}s"
        )

    def evaluated(self, round: int, result: dict) -> None:
        if "reward_accuracy" in result:  # task=dpo
            extra = f"reward accuracy {result['reward_accuracy']:.3f}, margin {result['margin']:.4f}"
        else:
            extra = f"perplexity {result['ppl']:.2f}"
        if "epsilon" in result:  # privacy.dp
            extra += f", epsilon {result['epsilon']:.3g} (delta {result['delta']:g})"
        self.console.log(f"round {round} held-out: loss {result['loss']:.4f}, {extra}")

    def federated_evaluated(self, round: int, result: dict) -> None:
        self.console.log(f"round {round} {federated_line(result)}")

    def round_finished(self, round: int, seconds: float) -> None:
        if self.rounds_task is not None:
            self.bars.update(self.rounds_task, advance=1)
            self._show_eta()
        else:  # no bars: a line per round says how far the run is
            self.console.log(f"round {round} done in {seconds:.1f}s; {format_eta(self.eta())}")

    def message(self, text: str) -> None:
        self.console.log(text)

    def run_finished(self) -> None:
        for task in (self.steps_task, self.rounds_task):
            self._remove(task)
        self.rounds_task = self.steps_task = None
        self.pending, self.steps_left = {}, 0

    # ------------------------------------------------------------------ phases

    def phase_started(self, name: str, total: Optional[int]) -> None:
        if not self.live and not self.phases:
            self.console.log(f"{name} ...")
        self.phases.append((name, self._add(name, total)))

    def phase_advanced(self, name: str, n: int) -> None:
        task = next((t for p, t in reversed(self.phases) if p == name), None)
        if task is not None:
            self.bars.update(task, advance=n)

    def phase_finished(self, name: str, seconds: float) -> None:
        at = max((i for i, (p, _) in enumerate(self.phases) if p == name), default=None)
        if at is None:
            return
        _, task = self.phases.pop(at)
        self._remove(task)
        self.phase_seconds.setdefault(name, []).append(seconds)
        if self.pending.get(name, 0) > 0:
            self.pending[name] -= 1
            self._show_eta()
        if not self.live and not self.phases:
            self.console.log(f"{name} done in {seconds:.1f}s")


def federated_line(result: dict) -> str:
    """A federated evaluation (evaluation/federated.py) in one line."""
    failed = f", {len(result['failed'])} failed" if result.get("failed") else ""
    if result.get("loss") is None:
        return f"federated evaluation: no held-out rows scored ({len(result['clients'])} clients{failed})"
    extra = (f"reward accuracy {result['reward_accuracy']:.3f}, margin {result['margin']:.4f}" if "reward_accuracy" in result
             else f"perplexity {result['ppl']:.2f}")
    return (f"federated evaluation: loss {result['loss']:.4f}, {extra} on {result['examples']} examples "
            f"of {len(result['clients'])} clients{failed}")
