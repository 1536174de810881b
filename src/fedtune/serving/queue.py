"""The model's waiting line: one generation at a time, at most ``max_waiting`` requests waiting
for it in arrival (FIFO) order; one more is refused at once (the server answers 429)."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Callable, Iterator


class QueueFull(Exception):
    """The model is busy and ``max_waiting`` requests already wait for it."""


class ModelQueue:
    def __init__(self, max_waiting: int, poll_s: float = 0.2):
        self.max_waiting, self.poll_s = max_waiting, poll_s
        self._cond = threading.Condition()
        self._line: deque = deque()  # waiting tickets, first in line first
        self._busy = False

    @property
    def waiting(self) -> int:
        return len(self._line)

    @contextlib.contextmanager
    def turn(self, cancelled: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold the model for the block. Raises QueueFull when the line is full, and LeftLine
        when ``cancelled()`` turns true while waiting (checked every ``poll_s``)."""
        ticket = object()
        with self._cond:
            if (self._busy or self._line) and len(self._line) >= self.max_waiting:
                raise QueueFull()
            self._line.append(ticket)
            try:
                while self._busy or self._line[0] is not ticket:
                    self._cond.wait(self.poll_s)
                    if cancelled():
                        raise LeftLine()
            except BaseException:
                self._line.remove(ticket)
                self._cond.notify_all()
                raise
            self._line.popleft()
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class LeftLine(Exception):
    """The caller's client went away while it waited for the model."""
