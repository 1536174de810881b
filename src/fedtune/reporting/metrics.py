"""``metrics.jsonl``: one JSON object per line (client fits, evaluations, rounds, samples).

Each line has a ``type`` and a ``round``. Lines are flushed as they are written, so a
crashed run keeps everything up to the crash; a checkpoint records how many lines it
covers and resuming cuts the file back to that point.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Append-only JSON Lines writer."""

    def __init__(self, path: Path):
        self.path = path
        self.lines = sum(1 for _ in read_metrics(path)) if path.exists() else 0

    def log(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_clean(record), sort_keys=False) + "\n")
        self.lines += 1

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
