"""The FedIT baselines as modes of the same engine: centralized and local-only training.

Both reuse the federated run's data pipeline, partition (``partition.json`` is identical for
the same seed and config), trainer, evaluator and round loop; only the client schedule and
the clients' data differ (``federation.mode``):

* **federated** — K of N clients per round, FedAvg of their updates.
* **centralized** — one client holding the union of all N training shards (the held-out set
  stays out). Budget: in round r it takes exactly
  ``B_r = sum over the federated schedule's clients c of round r of S(c, r)`` optimizer steps,
  where ``S(c, r)`` is the number of steps client c would take in round r (train.local_steps,
  or its local_epochs over its shard). Batch size, grad_accum, learning-rate schedule and
  warm-up are the same, so both runs make the same number of optimizer steps over the same
  number of examples: ``sum_r B_r`` (the federated run's total). Its AdamW state restarts
  each round, like a client's. It evaluates after every round, like the federated run.
* **local** — one client trains alone on its own shard: every round it makes the steps it
  would make when sampled in the federation (``S(c, r)``), from the adapter it ended the
  previous round with (FedAvg of a single update is that update). So a local-only client gets
  all R rounds of its own work, more than its expected ``R K / N`` rounds in the federation,
  and far less data than the federation sees: the FedIT local baseline (one client's data).
  Several clients (``local.clients``, or ``local.count`` random ones) each get their own run
  directory ``<output.dir>/local-<id>``; one run directory holds one local client.

Engines: federated and local runs honour ``federation.engine`` (a local run on Flower is a
federation whose schedule is its one client). Centralized training pools every client's
data in one process, which is exactly what a federation forbids, so it has no Flower form:
the config refuses ``federation.mode=centralized`` with ``federation.engine=flower``, and
``fedtune compare`` runs its centralized baseline in-process (:func:`with_mode`) and says so
in its budget note.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedtune.config import AttackConfig, CompareConfig, LocalConfig, PrivacyConfig, RunConfig, StrategyConfig
from fedtune.errors import ConfigError
from fedtune.federation.clients import Clients, LocalClients
from fedtune.seeding import generator

POOLED_CLIENT = 0  # the id of the one client of a centralized run


def with_mode(cfg: RunConfig, mode: str, out_dir: Path | str, local_client: int | None = None) -> RunConfig:
    """``cfg`` as a ``mode`` run writing to ``out_dir``. Settings that do not apply to the
    mode (local.* outside local mode, compare.*, and for the baselines strategy.*: FedAvg of
    one update is plain training; federation.min_clients: a baseline round has one client;
    privacy.* and attack.*: the baselines are the non-private, honest references) go back to their defaults, so the same sub-run gets the
    same config (and can be reused) whatever the comparison around it."""
    local = LocalConfig(clients=[local_client]) if mode == "local" else LocalConfig()
    if mode == "federated":
        federation = dataclasses.replace(cfg.federation, mode=mode)
    else:  # centralized pools the clients' data, which no federation does: always in-process (module doc)
        engine = "inprocess" if mode == "centralized" else cfg.federation.engine
        federation = dataclasses.replace(cfg.federation, mode=mode, min_clients=1, engine=engine)
    return dataclasses.replace(
        cfg,
        federation=federation,
        strategy=cfg.strategy if mode == "federated" else StrategyConfig(),
        privacy=cfg.privacy if mode == "federated" else PrivacyConfig(),  # baselines are the non-private references
        attack=cfg.attack if mode == "federated" else AttackConfig(),
        local=local,
        output=dataclasses.replace(cfg.output, dir=str(out_dir)),
        compare=CompareConfig(),
    )


def local_client_ids(cfg: RunConfig) -> list[int]:
    """``local.clients``, or ``local.count`` clients drawn from (seed, "local")."""
    if cfg.local.clients:
        return list(cfg.local.clients)
    if cfg.local.count > cfg.partition.num_clients:
        raise ConfigError(f"local.count: {cfg.local.count} is more than partition.num_clients={cfg.partition.num_clients}; lower it")
    rng = generator(cfg.seed, "local")
    return sorted(rng.choice(cfg.partition.num_clients, size=cfg.local.count, replace=False).tolist())


def local_configs(cfg: RunConfig, parent: Path | str) -> list[RunConfig]:
    """One local-mode config per selected client, writing to ``parent/local-<id>``."""
    return [with_mode(cfg, "local", Path(parent) / f"local-{c}", c) for c in local_client_ids(cfg)]


def check_mode(cfg: RunConfig) -> None:
    """A run directory holds one local client; several are run one by one (see module doc)."""
    if cfg.federation.mode == "local" and len(cfg.local.clients) != 1:
        raise ConfigError(
            f"federation.mode=local: one run trains one client, got local.clients={cfg.local.clients}; "
            "set local.clients=[ID], or use `fedtune run`/`fedtune compare`, which give each client its own run"
        )


def fixed_schedule(cfg: RunConfig) -> list[int]:
    """The clients of every round of a baseline: the pooled client, or the one local client."""
    return [POOLED_CLIENT] if cfg.federation.mode == "centralized" else [cfg.local.clients[0]]


def centralized_budget(federated_schedule, federated_clients: Clients, rounds: int) -> dict[int, int]:
    """``{r: B_r}``: the optimizer steps the federated schedule gives round r (module doc)."""
    return {r: sum(federated_clients.steps(c, r) for c in federated_schedule(r)) for r in range(1, rounds + 1)}


def pooled_clients(federated_schedule, clients: LocalClients, rounds: int) -> LocalClients:
    """One client holding every training shard, trained for the federated step budget.

    ``federated_schedule(round) -> [client ids]`` is the schedule the federated run with this
    config would follow, and ``clients`` its per-client shards."""
    assert isinstance(clients, LocalClients), "centralized runs in-process (refused on Flower by config validation)"
    budget = centralized_budget(federated_schedule, clients, rounds)
    pooled = [example for shard in clients.data for example in shard]
    return LocalClients(clients.trainer, [pooled], clients.progress, round_steps=budget, holdout=clients.holdout)
