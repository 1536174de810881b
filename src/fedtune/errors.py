"""User-facing errors.

Anything a user can cause (a bad config, a bad data row, a missing file, an incompatible
checkpoint) raises a :class:`FedtuneError` subclass whose message is one line naming the
thing and the fix. The CLI prints ``error: <message>`` and exits with the class's code;
library code never prints.
"""

from __future__ import annotations


class FedtuneError(Exception):
    """Base class of errors a user can cause and fix."""

    exit_code = 1


class ConfigError(FedtuneError):
    """A config key is unknown, mistyped or has an impossible value."""

    exit_code = 2

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(FedtuneError):
    """A data file is missing or a row does not have what the task needs."""

    exit_code = 3


class CheckpointError(FedtuneError):
    """A run directory or checkpoint is missing, corrupt or incompatible."""

    exit_code = 4


class AggregationError(FedtuneError):
    """A client update cannot be merged (wrong keys, shapes, dtype or weights)."""

    exit_code = 5


class ModelError(FedtuneError):
    """The base model or its tokenizer cannot be loaded or used as asked."""

    exit_code = 6


class JudgeError(FedtuneError):
    """The LLM judge endpoint is unreachable, refuses the request or answers malformed JSON."""

    exit_code = 7


class FederationError(FedtuneError):
    """A distributed federation cannot run as set up (nodes missing, two nodes claiming one client)."""

    exit_code = 8
