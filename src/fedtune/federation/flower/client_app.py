"""The fedtune ClientApp: a Flower message in, one ``LocalTrainer.fit`` on this node's data,
the update out. No math here: the fit is the in-process engine's.

Which data a node trains on comes from its ``--node-config``:

- ``data-path="/data/mine.jsonl" client-id=3``: a data owner's own file (read with the run's
  ``data.*`` settings; every row trains). The file never leaves the node.
- ``partition-id=3`` (what Flower's simulation gives each virtual node, also usable by a
  SuperNode): shard 3 of the run's own ``data.path`` split, exactly as the in-process engine
  splits it.

Flower may run many messages in one process (the simulation's Ray actors live for the whole
run) or start a process per message (deployment, ``--isolation subprocess``). Either way the
base model and the tokenised shard are built once per process and kept in :data:`CACHE`, the
one module-level cache the house rules allow.

A SCAFFOLD client keeps its control variate c_i, and a compressing client its error-feedback
residual, in Flower's per-node run state (``context.state``), so they live as long as the
SuperNode's run: a resumed run (a new Flower run) starts them at zero again, where the
in-process engine restores them from disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client.sft import LocalTrainer
from fedtune.config import RunConfig, to_dict
from fedtune.data.batching import plan_steps
from fedtune.errors import ConfigError
from fedtune.federation import setup
from fedtune.federation.compression import encode_upload
from fedtune.federation.flower import node_cache, records
from fedtune.federation.flower.runconfig import config_from_run_config, parse_config
from fedtune.model.base import cache_root
from fedtune.server.sampling import local_steps_per_client
from fedtune.types import SERVER_CONTROL

log = logging.getLogger(__name__)

DATA_PATH = "data-path"  # --node-config keys
CLIENT_ID = "client-id"
PARTITION_ID = "partition-id"  # Flower's simulation sets this one
SCAFFOLD_STATE = "fedtune.scaffold_control"  # the node's c_i in context.state
RESIDUAL_STATE = "fedtune.upload_residual"  # the node's error-feedback residual


class NodeCache:
    """This process's base model + trainer, and tokenised shards, keyed by the settings that
    built them (a new run with other settings rebuilds them). Shards are also kept on the
    node's disk (node_cache.py): Flower starts a process per message in a deployment. The
    counts and seconds in :meth:`report` go into each fit's metrics (for benchmarks)."""

    def __init__(self):
        self.trainer_key: Optional[str] = None
        self.bundle: Optional[setup.ModelBundle] = None
        self.trainer: Optional[LocalTrainer] = None
        self.shards: dict[str, tuple[int, list]] = {}
        self.model_loads = 0  # how often this process built the base model (for benchmarks)
        self.disk: Optional[node_cache.ShardCache] = None
        self.watch = node_cache.Stopwatch()
        self.threads = 0
        self.age: Optional[float] = None

    def get_trainer(self, cfg: RunConfig, node_config: Optional[dict] = None) -> LocalTrainer:
        self.watch = node_cache.Stopwatch()  # one handler call's timings
        self.age = node_cache.process_age()  # at handler entry: the process's start-up so far
        self.threads = node_cache.set_threads(node_cache.client_threads(node_config or {}, cfg.flower.client_cpus))
        key = _key(cfg.seed, cfg.model, cfg.lora, cfg.train)
        if key != self.trainer_key:
            self.bundle = self.trainer = None  # free the old model before loading another
            node_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_adapter=None))
            self.bundle = self.watch.time("model_load", lambda: setup.build_model(node_cfg))  # the server sends the starting adapter
            self.trainer = setup.build_trainer(node_cfg, self.bundle)
            self.trainer_key, self.model_loads = key, self.model_loads + 1
        return self.trainer

    def get_shard(self, cfg: RunConfig, node_config: dict) -> tuple[int, list]:
        """(client id, examples) of this node; encoded once the model's tokenizer is loaded."""
        key = _key(cfg.seed, cfg.data, cfg.partition, sorted(node_config.items()), self.trainer_key)
        if key not in self.shards:
            client, examples = self.watch.time("data_load", lambda: node_examples(cfg, node_config))
            examples = setup.build_client_side(cfg).training_examples(client, examples)  # a simulated data attacker's poison
            self.shards[key] = (client, self.watch.time("tokenise", lambda: self.encode(cfg, node_config, examples)))
        return self.shards[key]

    def encode(self, cfg: RunConfig, node_config: dict, examples: list) -> list:
        """``examples`` tokenised, from the node's disk cache when the same text, tokenizer,
        template and max_length were tokenised before."""
        directory = Path(node_config.get(node_cache.CACHE_DIR) or cache_root() / "shards")
        if self.disk is None or self.disk.directory != directory:
            self.disk = node_cache.ShardCache(directory)
        tok, d = self.bundle.tokenizer, cfg.data
        key = node_cache.shard_key(examples, node_cache.tokenizer_fingerprint(tok), d.template, d.max_length)
        return self.disk.get(key, lambda: setup.encode_examples(tok, examples, d.template, d.max_length))

    def report(self) -> dict:
        """This call's load seconds and this process's counts (fit metrics, for benchmarks)."""
        out = {f"{k}_seconds": v for k, v in self.watch.seconds.items()}
        if self.age is not None:
            out["process_age_seconds"] = self.age
        out.update(model_loads=self.model_loads, torch_threads=self.threads,
                   shard_disk_hits=self.disk.hits if self.disk else 0, shard_builds=self.disk.builds if self.disk else 0)
        return out


CACHE = NodeCache()


def _key(*parts) -> str:
    return json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)


def node_examples(cfg: RunConfig, node_config: dict) -> tuple[int, list]:
    """(client id, examples) this node trains on, from its ``--node-config``."""
    if DATA_PATH in node_config:
        client = node_config.get(CLIENT_ID)
        if not isinstance(client, int) or isinstance(client, bool) or client < 0:
            raise ConfigError(f"SuperNode --node-config: {DATA_PATH} needs {CLIENT_ID}=N (a number from 0) beside it")
        own = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(node_config[DATA_PATH])))
        examples, report = setup.load_data(own)
        log.info("client %d: %d examples from %s (%d skipped)", client, len(examples), report.source, report.skipped)
        return client, examples
    if PARTITION_ID in node_config:
        client = int(node_config[PARTITION_ID])
        examples, _, partition = setup.load_and_split(cfg)
        if client >= len(partition.shards):
            raise ConfigError(f"SuperNode --node-config: {PARTITION_ID}={client}, but partition.num_clients={len(partition.shards)}")
        return client, [examples[i] for i in partition.shards[client]]
    raise ConfigError(
        f"SuperNode --node-config names no data: start it with --node-config '{DATA_PATH}=\"/path/data.jsonl\" {CLIENT_ID}=0'"
    )


def node_choice(choices: list, cfg: RunConfig, client: int, stream: str) -> Optional[int]:
    """``client``'s own value of a per-client draw, as the in-process engine draws it."""
    values = local_steps_per_client(choices, cfg.partition.num_clients, cfg.seed, stream=stream)
    return None if values is None or client >= len(values) else values[client]


def client_steps(cfg: RunConfig, client: int) -> Optional[int]:
    """``client``'s own steps per round under train.local_steps_per_client (None: the trainer's)."""
    return node_choice(cfg.train.local_steps_per_client, cfg, client, "workload")


def count_steps(cfg: RunConfig, num_examples: int, client: int) -> int:
    """Optimizer steps ``client`` with ``num_examples`` takes per round (the plan's length does
    not depend on the example lengths, the round or the seed)."""
    t, own = cfg.train, client_steps(cfg, client)
    plan = plan_steps([1] * num_examples, t.batch_size, t.grad_accum, np.random.default_rng(0),
                      epochs=t.local_epochs, max_steps=t.local_steps if own is None else own, by_length=(t.batching == "length"))
    return len(plan)


def node_control(context: Context, server_control: dict) -> dict:
    """This node's SCAFFOLD variate c_i, kept in Flower's per-node run state (zeros at first)."""
    if SCAFFOLD_STATE in context.state.array_records:
        stored = records.from_record(context.state[SCAFFOLD_STATE])
        if stored.keys() == server_control.keys() and all(stored[k].shape == v.shape for k, v in server_control.items()):
            return stored
        log.warning("discarding a stored SCAFFOLD variate that does not fit this adapter")
    return {k: torch.zeros_like(v) for k, v in server_control.items()}


def answer_query(cfg: RunConfig, message: Message, context: Context) -> Message:
    """Which client this node holds, its example count and steps per round (no model needed)."""
    client, examples = node_examples(cfg, dict(context.node_config))
    return Message(records.node_content(client, len(examples), count_steps(cfg, len(examples), client)), reply_to=message)


def answer_train(cfg: RunConfig, message: Message, context: Context) -> Message:
    """One local fit on this node's data, from the global adapter in ``message``."""
    adapter, client, round, lr, client_config = records.read_train(message.content)
    started = time.perf_counter()
    trainer = CACHE.get_trainer(cfg, dict(context.node_config))
    holds, examples = CACHE.get_shard(cfg, dict(context.node_config))
    setup_seconds = time.perf_counter() - started  # ~0 when this process already holds them
    if holds != client:
        raise ConfigError(f"a message for client {client} reached the SuperNode holding client {holds}")
    control = node_control(context, client_config[SERVER_CONTROL]) if SERVER_CONTROL in client_config else None
    rank = node_choice(cfg.lora.client_ranks, cfg, client, "ranks")
    update = trainer.fit(client, examples, adapter, round=round, lr=lr, client_config=client_config,
                         client_control=control, local_steps=client_steps(cfg, client), rank=rank)
    update.rank = rank
    if update.control_delta is not None:  # the node keeps c_i^+ = c_i + Delta c_i for its next round
        context.state[SCAFFOLD_STATE] = records.to_record({k: control[k] + update.control_delta[k] for k in control})
    update = setup.build_client_side(cfg).outgoing(update, round)  # a simulated attack, or local DP noise
    residual = records.from_record(context.state[RESIDUAL_STATE]) if RESIDUAL_STATE in context.state.array_records else None
    payload, residual = encode_upload(update, setup.compression_of(cfg), residual)
    if residual is not None:  # error feedback: what this upload dropped goes into the next one
        context.state[RESIDUAL_STATE] = records.to_record(residual)
    update.metrics.update(setup_seconds=setup_seconds, **CACHE.report())
    log.info("round %d client %d: loss %.4f, %d steps", round, client, update.metrics["loss"], update.metrics["steps"])
    return Message(records.update_content(update, payload), reply_to=message)


def make_client_app(config_yaml: Optional[str] = None) -> ClientApp:
    """The ClientApp. Deployment reads the run's config from the run config (``flwr run``);
    the simulation passes it here.

    The handlers only call module-level functions: Ray pickles this app for every message,
    and a module-level function travels by reference, so :data:`CACHE` is the actor's own
    (a closure over it would carry a fresh copy each time).
    """
    app = ClientApp()

    def config(context: Context) -> RunConfig:
        return parse_config(config_yaml) if config_yaml is not None else config_from_run_config(context.run_config)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return answer_query(config(context), message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return answer_train(config(context), message, context)

    return app


app = make_client_app()
