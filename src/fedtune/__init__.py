"""fedtune: federated fine-tuning of large language models (FedIT, FedDPO) with LoRA.

The Python API (the functions the ``fedtune`` command runs; see :mod:`fedtune.api`)::

    from fedtune import load_config, run, evaluate, compare, export

They are imported on first use, so ``import fedtune`` stays light (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_API = ("load_config", "run", "evaluate", "compare", "export")
__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports them lazily
    from fedtune.api import compare, evaluate, export, load_config, run  # noqa: F401


def __getattr__(name: str):
    if name in _API:
        from fedtune import api

        value = getattr(api, name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module 'fedtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
