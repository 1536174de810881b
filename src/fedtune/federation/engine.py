"""Run a federation on the engine ``federation.engine`` names."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.federation.rundir import RunResult


def run(cfg: RunConfig, **kwargs) -> RunResult:
    """``inprocess``: every client in this process. ``flower``: Flower's simulation runtime
    (a Flower deployment is started with ``fedtune flower run`` instead). Keyword arguments
    are those of :func:`fedtune.federation.inprocess.run` (resume, progress, stop)."""
    if cfg.federation.engine == "flower":
        from fedtune.federation.flower import simulation

        return simulation.run(cfg, **kwargs)
    from fedtune.federation import inprocess

    return inprocess.run(cfg, **kwargs)
