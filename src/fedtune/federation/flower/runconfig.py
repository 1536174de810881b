"""The fedtune config inside a Flower run config.

A Flower run carries a flat ``run_config`` (the app's ``[tool.flwr.app.config]`` plus
``flwr run --run-config`` overrides). fedtune puts the whole resolved config there as YAML
text under :data:`CONFIG_KEY`, so the ServerApp and every ClientApp read the same settings,
validated where the run was started, and nothing depends on files at the SuperLink's cwd.
"""

from __future__ import annotations

import yaml

from fedtune.config import RunConfig, dump_yaml, from_dict
from fedtune.errors import ConfigError

CONFIG_KEY = "fedtune-config"
RESUME_KEY = "resume"


def run_config_of(cfg: RunConfig, resume: bool = False) -> dict:
    """The Flower run config that carries ``cfg``."""
    return {CONFIG_KEY: dump_yaml(cfg), RESUME_KEY: resume}


def parse_config(text: str) -> RunConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"run config '{CONFIG_KEY}': not valid YAML ({err})") from None
    return from_dict(raw or {})


def config_from_run_config(run_config: dict) -> RunConfig:
    text = run_config.get(CONFIG_KEY)
    if not isinstance(text, str):
        raise ConfigError(
            f"the Flower run config has no '{CONFIG_KEY}'; start runs with `fedtune flower run CONFIG.yaml` "
            "or `flwr run` on an app written by `fedtune flower app CONFIG.yaml`"
        )
    return parse_config(text)
