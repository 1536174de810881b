"""fedtune's Python API: what the CLI does, as functions (``from fedtune import ...``).

    cfg = load_config("demo", {"federation.rounds": 2, "output.dir": "runs/try"})
    result = run(cfg)                       # a RunResult: run_dir, rounds_done, final_eval ...
    record = evaluate(result.run_dir)       # held-out loss per category, ROUGE-L, exact match
    comparison = compare("demo-compare")    # base vs local vs federated vs centralized

A config is a YAML file, a bundled recipe's name (``fedtune.recipes()``), a RunConfig or
None (the defaults); overrides are ``["key=value", "~key"]`` as on the command line, or a
mapping ``{"key": value}``. Errors are :class:`fedtune.errors.FedtuneError` subclasses with
one-line messages. Nothing here prints; pass ``progress`` (a
:class:`fedtune.reporting.progress.Progress`) to follow a run, ``stop`` (a threading.Event)
to stop it after the current round.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from fedtune.config import RunConfig

Config = Union[str, Path, RunConfig, None]
Overrides = Union[Sequence[str], Mapping[str, Any], None]


def _override_list(overrides: Overrides) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):  # values as Python objects: JSON is YAML, so they parse back exactly
        return [f"{key}={json.dumps(str(v) if isinstance(v, Path) else v)}" for key, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return [str(o) for o in overrides]


def load_config(config: Config = None, overrides: Overrides = None) -> RunConfig:
    """The validated RunConfig of ``config`` with ``overrides`` applied (ConfigError lists
    every problem at once)."""
    from fedtune.config import from_dict, parse_overrides, to_dict
    from fedtune.config import load_config as load

    if isinstance(config, RunConfig):
        return from_dict(parse_overrides(to_dict(config), _override_list(overrides)))
    return load(config, _override_list(overrides))


def run_config(config: Config = None, overrides: Overrides = None, *, resume: Union[str, Path, None] = None) -> RunConfig:
    """The config :func:`run` uses: with ``resume`` and no ``config``, the run directory's own
    (saved) config; ``output.dir`` is then the resumed directory."""
    if resume is None:
        return load_config(config, overrides)
    extra = _override_list(overrides) + [f"output.dir={json.dumps(str(resume))}"]
    if config is None:  # the run's own config (read as saved: no recipe lookup)
        from fedtune.config import from_dict, parse_overrides, read_yaml
        from fedtune.federation.rundir import CONFIG_FILE

        return from_dict(parse_overrides(read_yaml(Path(resume) / CONFIG_FILE), extra))
    return load_config(config, extra)


def run(config: Config = None, overrides: Overrides = None, *, resume: Union[str, Path, None] = None,
        from_round: Optional[int] = None, progress=None, stop: Optional[threading.Event] = None):
    """Run the federation ``config`` describes (or continue the run directory ``resume`` from its
    last checkpoint, or from kept round ``from_round``). Returns its RunResult, or a list of
    them (one per client) when ``federation.mode=local`` trains several clients alone."""
    from fedtune.errors import ConfigError

    if from_round is not None and resume is None:
        raise ConfigError("--from-round N needs --resume RUN_DIR (the run to rewind)")
    cfg = run_config(config, overrides, resume=resume)
    if cfg.federation.mode == "local" and len(cfg.local.clients) != 1 and resume is None:
        from fedtune.evaluation.compare import run_local_each

        return run_local_each(cfg, progress=progress, stop=stop)  # one run directory per client
    from fedtune.federation.engine import run as run_federation

    return run_federation(cfg, resume=resume is not None, from_round=from_round, progress=progress, stop=stop)


def evaluate(run_dir: Union[str, Path], *, data: Optional[str] = None, base: bool = False, overrides: Overrides = None,
             progress=None) -> dict:
    """Evaluate a run's adapter (``base``: the base model) on its held-out set or on the file
    ``data``: held-out loss and perplexity per category, ROUGE-L, exact match (and the judge
    when ``eval.judge`` is set). Saved under ``run_dir/evaluations/``; returns the record."""
    from fedtune.evaluation.evaluate import evaluate_run

    return evaluate_run(Path(run_dir), data=data, base=base, overrides=_override_list(overrides), progress=progress)


def compare(config: Config = None, overrides: Overrides = None, *, progress=None, stop: Optional[threading.Event] = None):
    """Train (or reuse) base / local-only / federated / centralized runs on one partition and
    evaluate them alike; a CompareResult (``folder``, ``comparison`` dict, None if stopped)."""
    from fedtune.evaluation.compare import compare as run_compare

    return run_compare(load_config(config, overrides), progress=progress, stop=stop)


def export(run_dir: Union[str, Path], out: Union[str, Path], *, format: str = "hf", dtype: str = "float32",
           overwrite: bool = False, progress=None):
    """Merge a run's adapter (or a PEFT adapter folder's) into its base model and write it to
    ``out``: ``format="hf"`` (safetensors folder; dtype float32/bfloat16/float16) or ``"gguf"``
    (llama.cpp; f32/f16/bf16/q8_0). Returns the ExportResult (folder, files). See
    :mod:`fedtune.model.export`."""
    from fedtune.model.export import export_model

    return export_model(Path(run_dir), Path(out), format=format, dtype=dtype, overwrite=overwrite, progress=progress)


def recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of every bundled recipe."""
    from fedtune.bundled_recipes import catalog

    return catalog()
