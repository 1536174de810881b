"""The records of one type in a finished run's metrics file, for the tests that run federations."""

from __future__ import annotations

from pathlib import Path

from fedtune.reporting.metrics import METRICS_FILE, read_metrics


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(Path(run_dir) / METRICS_FILE) if r["type"] == kind]
