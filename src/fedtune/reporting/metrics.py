"""``metrics.jsonl``: one JSON object per line (client fits, evaluations, rounds, samples).

Each line has a ``type`` and a ``round``. Lines are flushed as they are written, so a
crashed run keeps everything up to the crash; a checkpoint records how many lines it
covers and resuming cuts the file back to that point.

:class:`MetricsLog` is the one place a run logs a record: each one written also goes to its
sinks, the experiment trackers of ``output.trackers`` (reporting/trackers.py).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

METRICS_FILE = "metrics.jsonl"

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Append-only JSON Lines writer that also feeds ``sinks`` (objects with ``log(record)``
    and ``close(failed)``). A context manager: leaving it closes the sinks."""

    def __init__(self, path: Path, sinks: Sequence = ()):
        self.path = path
        self.lines = sum(1 for _ in read_metrics(path)) if path.exists() else 0
        self.sinks = list(sinks)

    def log(self, record: dict) -> None:
        record = _clean(record)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
        self.lines += 1
        for sink in list(self.sinks):
            try:
                sink.log(record)
            except Exception as err:  # a tracker must not end a run whose metrics.jsonl is intact
                log.warning("tracker %s failed (%s); it gets no more records this run (metrics.jsonl has them all)",
                            type(sink).__name__, err)
                self.sinks.remove(sink)

    def close(self, failed: bool = False) -> None:
        for sink in self.sinks:
            try:
                sink.close(failed)
            except Exception as err:  # closing one must not keep the others open
                log.warning("tracker %s did not close cleanly (%s)", type(sink).__name__, err)
        self.sinks = []

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        self.close(failed=exc_type is not None)

    def truncate(self, lines: int) -> None:
        """Keep the first ``lines`` lines (those a checkpoint covers)."""
        kept = list(read_metrics(self.path))[:lines] if self.path.exists() else []
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)
        self.lines = len(kept)


def read_metrics(path: Path) -> Iterator[dict]:
    """Records of a metrics file; a torn last line (crash mid-write) is ignored."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return
