"""Build a run's components from its config: data, partition, model, trainer, evaluator.

These ``build_*`` functions are the only place (besides the CLI) that reads the config
tree; the components they build take plain values. Setup order matters: the tokenizer is
needed to encode data, and the partition must exist before clients get their shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from fedtune.client.dpo import PreferenceTrainer
from fedtune.client.sft import LocalTrainer
from fedtune.config import (
    ATTACK_SCALES, DEMO_DATA, NORM_BOUND_FACTOR, STRATEGY_PARAMS, RunConfig, federated_eval, per_round, small_round_warnings,
)
from fedtune.data import partition as part
from fedtune.data.demo import demo_examples
from fedtune.data.demo_preferences import demo_preferences
from fedtune.data.preferences import EncodedPair, PreferencePair, encode_preferences, load_preferences
from fedtune.data.prompts import Encoded, encode_pairs, render_example
from fedtune.data.sources import Example, LoadReport, load_examples
from fedtune.errors import CheckpointError, ConfigError, ModelError
from fedtune.evaluation.base_cache import BaseEvalCache
from fedtune.evaluation.heldout import HeldoutEvaluator
from fedtune.evaluation.preferences import PreferenceEvaluator
from fedtune.federation.attacks import ClientSide, malicious_clients
from fedtune.federation.client_eval import ClientHoldout, split_rows
from fedtune.federation.client_state import ClientStateStore
from fedtune.federation.clients import LocalClients
from fedtune.federation.compression import Compression
from fedtune.federation.rundir import CLIENT_STATE, CONFIG_FILE, PARTITION_FILE, finished_adapter, write_atomic
from fedtune.model.attention import use_packed_attention
from fedtune.model.base import cache_root, load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path
from fedtune.model.frozen import store_in
from fedtune.model.forward import caches_every_position
from fedtune.model.lora import adapter_parameters, attach_lora, get_adapter, load_adapter
from fedtune.privacy.dpfedavg import DPFedAvg
from fedtune.reporting.progress import Progress
from fedtune.seeding import generator, torch_seed
from fedtune.server import strategies
from fedtune.server.aggregate import build_aggregator
from fedtune.server.sampling import local_steps_per_client
from fedtune.types import Adapter

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- data


@dataclass
class Partition:
    """Client shards and the global held-out set, as row ids into the example list."""

    shards: list[list[int]]
    holdout: list[int]
    method: str
    fingerprint: str  # of the examples, to detect changed data on resume
    client_holdout: list[list[int]] = field(default_factory=list)  # eval.federated: each client's own held-out rows

    def to_json(self, categories: list[str]) -> dict:
        return {
            "method": self.method,
            "data_fingerprint": self.fingerprint,
            "num_clients": len(self.shards),
            "holdout": self.holdout,
            "clients": {str(c): ids for c, ids in enumerate(self.shards)},
            "categories": {str(c): t for c, t in part.category_table(self.shards, categories).items()},
            **({"client_holdout": {str(c): ids for c, ids in enumerate(self.client_holdout)}} if self.client_holdout else {}),
        }


def check_partition(run_dir: Path, partition: Partition, categories: list[str]) -> None:
    """On resume: the data still splits as ``partition.json`` recorded (a missing file is rewritten)."""
    path = run_dir / PARTITION_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is unreadable ({err}); delete it and resume: it is rewritten from data.path and the config"
        ) from None
    record = partition.to_json(categories)
    if not isinstance(saved, dict) or any(saved.get(k) != record.get(k) for k in ("data_fingerprint", "clients", "client_holdout")):
        raise CheckpointError(f"{path}: the data or its split changed since the run started; restore data.path or start a new run")


def write_partition(run_dir: Path, partition: Partition, categories: list[str], check: bool = False) -> None:
    """Write ``partition.json``; when resuming (``check``), verify the data still splits the same way."""
    if check:
        check_partition(run_dir, partition, categories)
        if (run_dir / PARTITION_FILE).is_file():
            return
    write_atomic(run_dir / PARTITION_FILE, json.dumps(partition.to_json(categories)))


Record = Union[Example, PreferencePair]  # a row of task=sft or task=dpo data


def load_data(cfg: RunConfig) -> tuple[list[Record], LoadReport]:
    d = cfg.data
    if d.path == DEMO_DATA:
        make = demo_preferences if cfg.task == "dpo" else demo_examples
        examples = make(d.demo_per_category, seed=0)[: d.limit]
        return examples, LoadReport("built-in demo data", len(examples))
    if cfg.task == "dpo":
        return load_preferences(d.path, asdict(d.columns), split=d.split, subset=d.subset, skip_invalid=d.skip_invalid, limit=d.limit)
    return load_examples(d.path, asdict(d.columns), split=d.split, subset=d.subset, skip_invalid=d.skip_invalid, limit=d.limit,
                         instruction_categories=d.instruction_categories)


def fingerprint(examples: list[Record]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps(astuple(e)).encode())
    return digest.hexdigest()[:16]


def make_partition(cfg: RunConfig, examples: list[Example]) -> Partition:
    p = cfg.partition
    categories = [e.category for e in examples]
    rng = generator(cfg.seed, "partition")
    train, holdout = part.holdout_split(categories, p.holdout_per_category, rng)
    if p.method == "iid":
        shards = part.iid(train, p.num_clients, rng)
    elif p.method == "shards":
        shards = part.shards(train, categories, p.num_clients, p.shards_per_client, rng)
    else:
        shards = part.dirichlet(train, categories, p.num_clients, p.alpha, p.min_per_client, rng)
    if not federated_eval(cfg):
        return Partition(shards, holdout, p.method, fingerprint(examples))
    split = [split_rows(cfg, c, shard) for c, shard in enumerate(shards)]  # each client's own held-out rows
    return Partition([t for t, _ in split], holdout, p.method, fingerprint(examples), [h for _, h in split])


def load_and_split(cfg: RunConfig) -> tuple[list[Record], LoadReport, Partition]:
    """The examples of ``data.path``, how loading went, and their split across clients."""
    examples, report = load_data(cfg)
    return examples, report, make_partition(cfg, examples)


def encode_examples(tokenizer, examples: list[Record], template: str, max_length: int) -> list[Union[Encoded, EncodedPair]]:
    if examples and isinstance(examples[0], PreferencePair):
        return encode_preferences(tokenizer, examples, template, max_length)
    pairs = [render_example(tokenizer, template, e.instruction, e.input, e.output) for e in examples]
    return encode_pairs(tokenizer, pairs, max_length, template)


# ----------------------------------------------------------------------------- model


@dataclass
class ModelBundle:
    """The one base model of this process, wrapped with LoRA, and what goes with it."""

    model: object  # peft.PeftModel
    tokenizer: object
    params: dict[str, torch.nn.Parameter]
    peft_config: object
    base_path: str
    device: torch.device
    precision: str
    initial_adapter: Adapter = field(default_factory=dict)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on a CUDA device with bf16, or on a CPU with native bf16
    (AVX512-BF16/AMX, as oneDNN reports it); fp32 elsewhere, where emulated bf16 is slower
    than fp32 (about 20x on a CPU without it)."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device; use fp32 (or bf16 on a CPU with bf16 support)")
    return precision


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def build_model(cfg: RunConfig, training: bool = False) -> ModelBundle:
    """The run's model with LoRA attached. ``training``: a process that trains (a run, a Flower
    node) keeps the frozen projections in bf16 where it trains under bf16 autocast (model/frozen.py);
    elsewhere (eval, chat, serve, export) they stay as loaded, so answers are the float32 model's."""
    m = cfg.model
    device = pick_device(m.device)
    base_path = resolve_model_path(m.name)
    tokenizer = load_tokenizer(base_path, m.trust_remote_code)
    precision = resolve_precision(cfg.train.precision, device)
    base = load_model(base_path, dtype=pick_dtype(m.dtype, device, precision), device=device, trust_remote_code=m.trust_remote_code,
                      quantize=m.quantize)
    if cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    try:
        model = attach_lora(
            base, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules, seed=torch_seed(cfg.seed, "init"), base_name=base_path,
        )
    except ValueError as err:  # peft: target modules not found
        raise ConfigError(f"lora.target_modules: {str(err).splitlines()[0]}") from None
    params = adapter_parameters(model)
    initial = get_adapter(params)
    if m.init_adapter:
        initial = read_init_adapter(m.init_adapter, initial)
    if training and precision == "bf16" and m.dtype == "auto" and m.quantize == "none":
        store_in(model, torch.bfloat16)  # float32 weights that autocast would cast every step (model/frozen.py)
    return ModelBundle(model, tokenizer, params, model.peft_config["default"], base_path, device, precision, initial)


def read_init_adapter(path: str, like: Adapter) -> Adapter:
    """An adapter from a run directory (its final ``adapter/``) or a PEFT folder."""
    folder = Path(path)
    if not folder.exists():  # e.g. the dpo-after-sft recipe's runs/demo, run from another directory
        raise CheckpointError(
            f"model.init_adapter: {path} does not exist (relative paths start at {Path.cwd()}); "
            "train that run first or set model.init_adapter to a run directory or PEFT adapter folder"
        )
    if finished_adapter(folder) is not None:
        folder = finished_adapter(folder)
    elif (folder / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"model.init_adapter: run {path} has not finished (no adapter/ yet); finish it with `fedtune run --resume {path}`"
        )
    adapter, _ = load_adapter(folder)
    if adapter.keys() != like.keys() or any(adapter[k].shape != like[k].shape for k in like):
        raise ModelError(
            f"model.init_adapter {path} does not fit this model and LoRA setup; use the same model.name and lora.* as its run"
        )
    return adapter


# on a few CPU cores matmuls over more rows run no faster per token; 768 rather than 1,024 keeps the throughput
# workload's bf16 peak under 2 GB (2.00 vs 2.27 GB) at 2.4% of its speed (benchmarks/results/step_memory.json)
CPU_BATCH_TOKENS = 768


def batch_token_limit(max_batch_tokens: Optional[int], device: torch.device) -> Optional[int]:
    """``train.max_batch_tokens``, with null meaning ``CPU_BATCH_TOKENS`` on CPU and no limit on CUDA."""
    if max_batch_tokens is not None:
        return max_batch_tokens
    return CPU_BATCH_TOKENS if device.type == "cpu" else None


EVAL_TOKENS_FACTOR = 4


def eval_token_limit(max_batch_tokens: Optional[int], device: torch.device) -> Optional[int]:
    """Tokens per held-out batch: ``EVAL_TOKENS_FACTOR`` times training's budget. Without
    gradients nothing is kept for backward (a layer's activations live while it runs), so 4x
    the tokens still peaks far below a training step, in fewer, larger matmuls (80 demo rows:
    one batch instead of five, 18% faster)."""
    limit = batch_token_limit(max_batch_tokens, device)
    return None if limit is None else EVAL_TOKENS_FACTOR * limit


def build_trainer(cfg: RunConfig, bundle: ModelBundle) -> Union[LocalTrainer, PreferenceTrainer]:
    t = cfg.train
    common = dict(
        pad_id=bundle.tokenizer.pad_token_id, batch_size=t.batch_size, grad_accum=t.grad_accum,
        local_epochs=t.local_epochs, local_steps=t.local_steps, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, by_length=(t.batching == "length"),
        max_tokens=batch_token_limit(t.max_batch_tokens, bundle.device), precision=bundle.precision, seed=cfg.seed,
        packing=t.packing and use_packed_attention(bundle.model),
    )
    if cfg.task == "dpo":
        d = cfg.dpo
        return PreferenceTrainer(
            bundle.model, bundle.params, beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
            reference=d.reference, initial_adapter=bundle.initial_adapter, **common,
        )
    return LocalTrainer(bundle.model, bundle.params, compile=t.compile, **common)


def build_clients(cfg: RunConfig, trainer: Union[LocalTrainer, PreferenceTrainer], data: list[list[Encoded]], progress: Progress, run_dir: Path,
                  holdout: Optional[ClientHoldout] = None) -> LocalClients:
    return LocalClients(
        trainer, data, progress, holdout=holdout,
        seed=cfg.seed, dropout=cfg.federation.dropout,
        local_steps=local_steps_per_client(cfg.train.local_steps_per_client, len(data), cfg.seed),
        state=ClientStateStore(run_dir / CLIENT_STATE, keep=cfg.output.keep_checkpoints),
        ranks=local_steps_per_client(cfg.lora.client_ranks, len(data), cfg.seed, stream="ranks"),
        compression=compression_of(cfg),
        client_side=build_client_side(cfg),
    )


def compression_of(cfg: RunConfig) -> Compression:
    c = cfg.compression
    return Compression(c.method, block=c.block, fraction=c.topk_fraction, error_feedback=c.error_feedback)


def build_privacy(cfg: RunConfig) -> Union[DPFedAvg, None]:
    """The run's DP-FedAvg (None with privacy.dp=off)."""
    p = cfg.privacy
    if p.dp == "off":
        return None
    return DPFedAvg(
        p.dp, clip_norm=p.clip_norm, noise_multiplier=p.noise_multiplier, delta=p.delta, population=cfg.partition.num_clients,
        per_round=per_round(cfg), seed=cfg.seed, target_epsilon=p.target_epsilon,
    )


def norm_bound_factor(cfg: RunConfig) -> Union[float, None]:
    """Validation's relative norm bound: privacy.norm_bound_factor, else the default without DP, else none."""
    if cfg.privacy.secure_aggregation:  # the server sees only the sum (secagg.py); config refuses a set factor
        return None
    if cfg.privacy.norm_bound_factor is not None:
        return cfg.privacy.norm_bound_factor
    return NORM_BOUND_FACTOR if cfg.privacy.dp == "off" else None


def build_client_side(cfg: RunConfig) -> ClientSide:
    """Attacks of the malicious clients (attack.*) and local DP (privacy.dp=local)."""
    a = cfg.attack
    return ClientSide(
        seed=cfg.seed, malicious=malicious_clients(cfg.partition.num_clients, a.fraction, cfg.seed), kind=a.kind,
        scale=a.scale if a.scale is not None else ATTACK_SCALES.get(a.kind, 1.0), poison_text=a.poison_text,
        trigger=a.trigger, target=a.target, poison_fraction=a.poison_fraction,
        local_dp=build_privacy(cfg) if cfg.privacy.dp == "local" else None,
    )


def client_shards(cfg: RunConfig, tokenizer, examples: list[Record], encoded: list, shards: list[list[int]]) -> list[list]:
    """Each client's encoded training examples; a data-attacking client's are poisoned first."""
    side = build_client_side(cfg)
    out = []
    for cid, shard in enumerate(shards):
        rows = [examples[i] for i in shard]
        mine = side.training_examples(cid, rows)
        out.append([encoded[i] for i in shard] if mine is rows else encode_examples(tokenizer, list(mine), cfg.data.template, cfg.data.max_length))
    return out


def build_strategy(cfg: RunConfig) -> strategies.Strategy:
    """The server strategy and its aggregator; logs the config's small-round warnings
    (config.small_round_warnings) once per run, for either engine."""
    for warning in small_round_warnings(cfg):
        log.warning("%s", warning)
    s = cfg.strategy
    aggregator = build_aggregator(
        s.aggregator, trim_beta=s.trim_beta, krum_f=s.krum_f, multikrum_m=s.multikrum_m, hetlora=cfg.lora.hetlora_aggregation
    )
    hyper = {k: getattr(s, k) for k in STRATEGY_PARAMS[s.name] if getattr(s, k) is not None}
    return strategies.build_strategy(s.name, aggregator=aggregator, num_clients=cfg.partition.num_clients, **hyper)


def build_evaluator(cfg: RunConfig, bundle: ModelBundle, encoded: list, categories: list[str]) -> Union[HeldoutEvaluator, PreferenceEvaluator]:
    """Held-out loss (sft), or DPO loss and reward accuracy/margin (dpo) against a fixed
    reference: the base model for dpo.reference=base, else the run's initial adapter (a
    moving per-round reference would make rounds incomparable)."""
    pad_id, batch_size = bundle.tokenizer.pad_token_id, cfg.eval.batch_size
    # batched as training batches: packed (per-example attention), cut at the same token budget, same autocast
    packing = cfg.train.packing and use_packed_attention(bundle.model)
    lean = dict(packing=packing, max_tokens=eval_token_limit(cfg.train.max_batch_tokens, bundle.device), precision=bundle.precision)
    if cfg.task == "dpo":
        d = cfg.dpo
        return PreferenceEvaluator(
            encoded, categories, params=bundle.params, reference_adapter=None if d.reference == "base" else bundle.initial_adapter,
            batch_size=batch_size, pad_id=pad_id, beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing, **lean,
        )
    shared = packing and caches_every_position(bundle.model)  # the prompts' common start run once (evaluation/heldout.py)
    return HeldoutEvaluator(encoded, categories, batch_size=batch_size, pad_id=pad_id, shared_prefix=shared, **lean)


def build_base_cache(cfg: RunConfig) -> BaseEvalCache:
    """The base-model evaluation cache of ``eval.base_cache`` (evaluation/base_cache.py)."""
    if not cfg.eval.base_cache:
        return BaseEvalCache(None)
    return BaseEvalCache(Path(cfg.eval.base_cache_dir).expanduser() if cfg.eval.base_cache_dir else cache_root() / "eval")


def sample_prompts(cfg: RunConfig, examples: list[Record], holdout: list[int]) -> list[dict]:
    """The configured ``eval.sample_prompts``; empty when there are none, for the run then picks
    held-out rows after training, from the categories that improved most (evaluation/samples.py)."""
    return [{"prompt": p, "input": "", "reference": None} for p in cfg.eval.sample_prompts]


def load_run_model(run_dir: Path, overrides: Sequence[str] = ()):
    """(config, model bundle with the run's adapter loaded, adapter folder) for a finished
    run; an unfinished run uses its newest checkpoint. ``overrides`` (``model.device=cpu``)
    change how the model loads."""
    from fedtune.config import load_config
    from fedtune.federation.checkpoint import latest_checkpoint
    from fedtune.model.lora import set_adapter

    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a fedtune run directory (no {CONFIG_FILE}); check the path")
    cfg = load_config(config_path, list(overrides))
    folder = finished_adapter(run_dir) or latest_checkpoint(run_dir)
    bundle = build_model(cfg)
    adapter, _ = load_adapter(folder)
    set_adapter(bundle.params, adapter)
    return cfg, bundle, folder
