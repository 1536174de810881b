"""Progress events of a run. The library calls a :class:`Progress`; it prints nothing itself.

:class:`Progress` ignores every event (library default, tests); :class:`RichProgress`, used by
the CLI, shows rounds, the client in training, its step, loss and an ETA.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence


class Progress:
    """Receives run events; every method is optional to implement."""

    def run_started(self, total_rounds: int, done_rounds: int, total_steps: int) -> None: ...
    def round_started(self, round: int, clients: Sequence[int]) -> None: ...
    def client_started(self, round: int, client: int, steps: int) -> None: ...
    def step(self, step: int, steps: int, loss: float) -> None: ...
    def client_finished(self, round: int, client: int, metrics: dict) -> None: ...
    def evaluated(self, round: int, result: dict) -> None: ...
    def round_finished(self, round: int, seconds: float) -> None: ...
    def message(self, text: str) -> None: ...
    def run_finished(self) -> None: ...


class RichProgress(Progress):
    """A live two-bar display (rounds; steps of the current client) with loss and ETA."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeRemainingColumn

        self.console = console or Console(stderr=True)
        self.bars = Bars(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
        )
        self.rounds_task: Optional[int] = None
        self.steps_task: Optional[int] = None
        self.started = time.perf_counter()

    def run_started(self, total_rounds: int, done_rounds: int, total_steps: int) -> None:
        self.bars.start()
        self.rounds_task = self.bars.add_task("rounds", total=total_rounds, completed=done_rounds, info="")
        self.steps_task = self.bars.add_task("steps", total=max(total_steps, 1), info="")

    def round_started(self, round: int, clients: Sequence[int]) -> None:
        self.bars.update(self.rounds_task, description=f"round {round}", info=f"clients {list(clients)}")

    def client_started(self, round: int, client: int, steps: int) -> None:
        self.bars.update(self.steps_task, description=f"client {client}", info="")

    def step(self, step: int, steps: int, loss: float) -> None:
        self.bars.update(self.steps_task, advance=1, info=f"loss {loss:.3f}")

    def client_finished(self, round: int, client: int, metrics: dict) -> None:
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

    def round_finished(self, round: int, seconds: float) -> None:
        self.bars.update(self.rounds_task, advance=1)

    def message(self, text: str) -> None:
        self.console.log(text)

    def run_finished(self) -> None:
        self.bars.stop()
