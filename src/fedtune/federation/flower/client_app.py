"""The fedtune ClientApp: a Flower message in, one client-pipeline fit on this node's data,
the update out. No math here: the fit is the in-process engine's (federation/client_fit.py).

Which data a node trains on comes from its ``--node-config``:

- ``data-path="/data/mine.jsonl" client-id=3``: a data owner's own file (read with the run's
  ``data.*`` settings; every row trains). The file never leaves the node.
- ``partition-id=3`` (what Flower's simulation gives each virtual node, also usable by a
  SuperNode): shard 3 of the run's own ``data.path`` split, exactly as the in-process engine
  splits it.

Many messages may run in one process (the simulation's Ray actors live for the whole run; a
SuperNode's ``fedtune flower worker`` under ``--isolation process`` lives across runs,
node_worker.py), or each in its own (Flower's ``--isolation subprocess``). Either way the base
model and the tokenised shard are built once per process and kept in :data:`CACHE`, the one
module-level cache the house rules allow.

The fit itself is the client pipeline both engines run (federation/client_fit.py): this
module only decodes the TRAIN message, calls it, and encodes the reply. A SCAFFOLD client's
control variate c_i and a compressing client's error-feedback residual live in a
ClientStateStore on the node's disk (federation/flower/node_state.py), so a resumed run
continues them exactly as the in-process engine does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client.sft import LocalTrainer
from fedtune.config import RunConfig, federated_eval, to_dict
from fedtune.data.batching import plan_steps
from fedtune.errors import ConfigError
from fedtune.federation import client_eval, setup
from fedtune.federation.client_eval import split_rows
from fedtune.federation.client_fit import ClientPipeline
from fedtune.federation.flower import node_cache, records, secagg
from fedtune.federation.flower.node_state import apply_rollbacks, node_store
from fedtune.federation.flower.runconfig import config_from_run_config, parse_config
from fedtune.model.base import cache_root, resolve_model_path
from fedtune.reporting.progress import Progress
from fedtune.server.sampling import local_steps_per_client

log = logging.getLogger(__name__)

DATA_PATH = "data-path"  # --node-config keys
CLIENT_ID = "client-id"
PARTITION_ID = "partition-id"  # Flower's simulation sets this one


class NodeCache:
    """This process's base model + trainer, and tokenised shards, keyed by the settings and
    files that built them, so a process that lives across runs (a SuperNode's worker,
    node_worker.py) never reuses a stale one. Shards are also kept on the node's disk, keyed
    by their content (node_cache.py), for processes that live one message. The counts
    and seconds in :meth:`report` go into each fit's metrics (for benchmarks)."""

    KEEP_SHARDS = 4  # tokenised shards kept in memory (the latest used)

    def __init__(self):
        self.trainer_key: Optional[str] = None
        self.bundle: Optional[setup.ModelBundle] = None
        self.trainer: Optional[LocalTrainer] = None
        self.tokenizer_hash = ""
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
        node_cfg = node_model_config(cfg)
        m = node_cfg.model
        files = [node_cache.files_fingerprint(resolve_model_path(m.name)), node_cache.files_fingerprint(m.init_adapter) if m.init_adapter else []]
        key = _key(cfg.seed, node_cfg.task, node_cfg.dpo, m, cfg.lora, cfg.train, files)
        if key != self.trainer_key:
            self.bundle = self.trainer = None  # free the old model before loading another
            self.bundle = self.watch.time("model_load", lambda: setup.build_model(node_cfg, training=True))
            self.trainer = setup.build_trainer(node_cfg, self.bundle)
            self.tokenizer_hash = node_cache.tokenizer_fingerprint(self.bundle.tokenizer)
            self.trainer_key, self.model_loads = key, self.model_loads + 1
        return self.trainer

    def get_shard(self, cfg: RunConfig, node_config: dict) -> tuple[int, list]:
        """(client id, examples) of this node, tokenised with the loaded model's tokenizer
        (call :meth:`get_trainer` first). Kept in memory under the whole config, the node's
        config and the data file's size and modification time (a stat, not a read), so a
        changed file or setting is never answered from memory."""
        where = node_config.get(DATA_PATH, cfg.data.path)
        key = _key(cfg, sorted(node_config.items()), node_cache.files_fingerprint(where), self.tokenizer_hash)
        if key not in self.shards:
            client, examples = self.watch.time("data_load", lambda: node_examples(cfg, node_config))
            examples = setup.build_client_side(cfg).training_examples(client, examples)  # a simulated data attacker's poison
            encoded = self.watch.time("tokenise", lambda: self.encode(cfg, node_config, examples))
            while len(self.shards) >= self.KEEP_SHARDS:
                self.shards.pop(next(iter(self.shards)))
            self.shards[key] = (client, encoded)
        else:
            self.shards[key] = self.shards.pop(key)  # the latest used stays
        return self.shards[key]

    def encode(self, cfg: RunConfig, node_config: dict, examples: list) -> list:
        """``examples`` tokenised, from the node's disk cache when the same text, tokenizer,
        template and max_length were tokenised before."""
        directory = Path(node_config.get(node_cache.CACHE_DIR) or cache_root() / "shards")
        if self.disk is None or self.disk.directory != directory:
            self.disk = node_cache.ShardCache(directory)
        tok, d = self.bundle.tokenizer, cfg.data
        key = node_cache.shard_key(examples, self.tokenizer_hash, d.template, d.max_length)
        return self.disk.get(key, lambda: setup.encode_examples(tok, examples, d.template, d.max_length))

    def report(self) -> dict:
        """This call's load seconds and this process's counts (fit metrics, for benchmarks)."""
        out = {f"{k}_seconds": v for k, v in self.watch.seconds.items()}
        if self.age is not None:
            out["process_age_seconds"] = self.age
        out.update(model_loads=self.model_loads, torch_threads=self.threads,
                   shard_disk_hits=self.disk.hits if self.disk else 0, shard_builds=self.disk.builds if self.disk else 0)
        return out


def node_model_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` as a node builds its model: the server sends the starting adapter every round,
    so ``model.init_adapter`` is read only where the node needs it itself, as DPO's reference
    policy (``dpo.reference=initial``); it must then be on the node's disk too."""
    if cfg.task == "dpo" and cfg.dpo.reference == "initial":
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_adapter=None))


CACHE = NodeCache()


def _key(*parts) -> str:
    return json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)


def node_examples(cfg: RunConfig, node_config: dict, held_out: bool = False) -> tuple[int, list]:
    """(client id, examples) this node trains on, from its ``--node-config``; with ``held_out``,
    the rows it keeps out of training for federated evaluation instead (eval.federated)."""
    if DATA_PATH in node_config:
        client = node_config.get(CLIENT_ID)
        if not isinstance(client, int) or isinstance(client, bool) or client < 0:
            raise ConfigError(f"SuperNode --node-config: {DATA_PATH} needs {CLIENT_ID}=N (a number from 0) beside it")
        own = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(node_config[DATA_PATH])))
        examples, report = setup.load_data(own)
        log.info("client %d: %d examples from %s (%d skipped)", client, len(examples), report.source, report.skipped)
        train, held = split_rows(cfg, client, examples) if federated_eval(cfg) else (examples, [])
        return client, held if held_out else train
    if PARTITION_ID in node_config:
        client = int(node_config[PARTITION_ID])
        examples, _, partition = setup.load_and_split(cfg)
        if client >= len(partition.shards):
            raise ConfigError(f"SuperNode --node-config: {PARTITION_ID}={client}, but partition.num_clients={len(partition.shards)}")
        ids = (partition.client_holdout[client] if partition.client_holdout else []) if held_out else partition.shards[client]
        return client, [examples[i] for i in ids]
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


def answer_query(cfg: RunConfig, message: Message, context: Context) -> Message:
    """Which client this node holds, its example count and steps per round (no model needed)."""
    client, examples = node_examples(cfg, dict(context.node_config))
    return Message(records.node_content(client, len(examples), count_steps(cfg, len(examples), client)), reply_to=message)


def answer_train(cfg: RunConfig, message: Message, context: Context, state_dir: Optional[str] = None) -> Message:
    """One client pipeline fit on this node's data, from the global adapter in ``message``;
    the node's client state lives under ``state_dir`` (node_state.py)."""
    adapter, client, round, lr, client_config = records.read_train(message.content)
    started = time.perf_counter()
    trainer = CACHE.get_trainer(cfg, dict(context.node_config))
    holds, examples = CACHE.get_shard(cfg, dict(context.node_config))
    setup_seconds = time.perf_counter() - started  # ~0 when this process already holds them
    if holds != client:
        raise ConfigError(f"a message for client {client} reached the SuperNode holding client {holds}")
    store = node_store(cfg, dict(context.node_config), state_dir)
    apply_rollbacks(store, client, *records.read_rollbacks(message.content))
    pipeline = ClientPipeline(trainer, setup.build_client_side(cfg), setup.compression_of(cfg), store)
    upload = pipeline.fit(client, examples, adapter, round=round, lr=lr, client_config=client_config,
                          local_steps=client_steps(cfg, client), rank=node_choice(cfg.lora.client_ranks, cfg, client, "ranks"),
                          setup_seconds=setup_seconds)
    update = upload.update
    update.metrics.update(CACHE.report())  # where this node's time went (node_cache.py; Flower only)
    log.info("round %d client %d: loss %.4f, %d steps", round, client, update.metrics["loss"], update.metrics["steps"])
    return Message(records.update_content(update, upload.payload), reply_to=message)


def answer_evaluate(cfg: RunConfig, message: Message, context: Context) -> Message:
    """Federated evaluation: the adapter in ``message`` scored on this node's own held-out rows
    (sums and counts, not means, so the server weights exactly; federation/client_eval.py).
    The rows are read and encoded per message (a few per client, once every eval.every rounds)."""
    adapter, client, round = records.read_evaluate(message.content)
    CACHE.get_trainer(cfg, dict(context.node_config))  # the node's model
    bundle = CACHE.bundle
    holds, examples = node_examples(cfg, dict(context.node_config), held_out=True)
    if holds != client:
        raise ConfigError(f"a message for client {client} reached the SuperNode holding client {holds}")
    rows = setup.encode_examples(bundle.tokenizer, examples, cfg.data.template, cfg.data.max_length)
    categories = [e.category for e in examples]
    evaluator = setup.build_evaluator(cfg, bundle, rows, categories)
    sums = client_eval.score(bundle.model, bundle.params, adapter, evaluator, rows, categories, cfg.task, Progress())
    log.info("round %d client %d: scored %d held-out rows", round, client, len(rows))
    return Message(records.score_content(client, sums), reply_to=message)


def make_client_app(config_yaml: Optional[str] = None, state_dir: Optional[str] = None) -> ClientApp:
    """The ClientApp. Deployment reads the run's config from the run config (``flwr run``);
    the simulation passes it here, and the folder of the nodes' client state (``state_dir``;
    a SuperNode's ``--node-config state-dir`` wins).

    The handlers only call module-level functions: Ray pickles this app for every message,
    and a module-level function travels by reference, so :data:`CACHE` is the actor's own
    (a closure over it would carry a fresh copy each time).
    """
    app = ClientApp(mods=[secagg.mod])  # SecAgg+ for the TRAIN messages that carry its configs

    def config(context: Context) -> RunConfig:
        return parse_config(config_yaml) if config_yaml is not None else config_from_run_config(context.run_config)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return answer_query(config(context), message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return answer_train(config(context), message, context, state_dir)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return answer_evaluate(config(context), message, context)

    return app


app = make_client_app()
