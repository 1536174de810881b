"""One typed config tree for a fedtune run.

Every setting is declared once below, with its default and help text. A run's config is
built from the dataclass defaults, then a YAML recipe, then ``a.b.c=value`` overrides
(``~a.b.c`` resets a key to its default). Unknown keys, wrong types and impossible values
are all collected and raised together as one :class:`~fedtune.errors.ConfigError`.

Only this module reads raw config dictionaries; components receive plain values.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from fedtune.errors import ConfigError

BUNDLED_MODEL = "smollm2-135m-instruct"
DEMO_DATA = "demo"


def _f(default: Any, help: str, **checks: Any) -> Any:
    """A config field with help text and optional checks (choices, ge, gt, le, lt)."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _f(BUNDLED_MODEL, "base model: 'smollm2-135m-instruct' (bundled, offline), a local folder or a hub name")
    dtype: str = _f("auto", "weights dtype (auto: bfloat16 on CUDA if supported, else float32)", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = _f("auto", "device (auto: CUDA if available, else CPU)", choices=("auto", "cpu", "cuda", "mps"))
    trust_remote_code: bool = _f(False, "allow custom model code from the hub")
    init_adapter: Optional[str] = _f(None, "start from this adapter (a run directory or a PEFT adapter folder)")


@dataclass
class LoraConfig:
    r: int = _f(8, "LoRA rank", gt=0)
    alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = _f(0.05, "dropout on the LoRA input", ge=0, lt=1)
    target_modules: Union[str, list[str]] = _f("all-linear", "modules to adapt: 'all-linear' or a list of names")


@dataclass
class ColumnsConfig:
    instruction: str = _f("instruction", "column holding the instruction (required)")
    input: str = _f("input", "column holding optional extra input/context")
    output: str = _f("output", "column holding the reference response (required)")
    category: str = _f("category", "column holding the task category (optional; used for non-IID splits)")


@dataclass
class DataConfig:
    path: str = _f(DEMO_DATA, "'demo' (built in), a .jsonl/.json/.csv/.parquet file, a folder, or a hub dataset name")
    columns: ColumnsConfig = _f(ColumnsConfig(), "column mapping from the source to fedtune's fields")
    split: str = _f("train", "split to load from a hub dataset or folder")
    subset: Optional[str] = _f(None, "hub dataset configuration name")
    template: str = _f("chat", "prompt format: the model's chat template or the Alpaca template", choices=("chat", "alpaca"))
    max_length: int = _f(256, "maximum tokens per example (prompt + response)", ge=16)
    skip_invalid: bool = _f(False, "skip rows with a missing/empty required field (they are counted and reported)")
    limit: Optional[int] = _f(None, "use only the first N valid rows", gt=0)
    demo_per_category: int = _f(300, "examples per category of the built-in demo data", gt=0)


@dataclass
class PartitionConfig:
    method: str = _f("iid", "how rows are split across clients", choices=("iid", "shards", "dirichlet"))
    num_clients: int = _f(10, "number of clients", ge=1)
    shards_per_client: int = _f(2, "shards per client for method=shards", ge=1)
    alpha: float = _f(0.5, "Dirichlet concentration for method=dirichlet (smaller = more skewed)", gt=0)
    min_per_client: int = _f(2, "minimum rows per client for method=dirichlet", ge=1)
    holdout_per_category: int = _f(10, "rows per category held out as the global test set", ge=0)


@dataclass
class FederationConfig:
    engine: str = _f(
        "inprocess",
        "engine that runs the rounds: this process, or Flower (`fedtune run` simulates on Ray; `fedtune flower run` deploys)",
        choices=("inprocess", "flower"),
    )
    rounds: int = _f(3, "number of federated rounds", ge=1)
    clients_per_round: Optional[int] = _f(None, "clients sampled per round (default: all)", ge=1)
    fraction: Optional[float] = _f(None, "fraction of clients sampled per round (instead of clients_per_round)", gt=0, le=1)
    sampling: str = _f("uniform", "client sampling: uniform, or weighted by data size", choices=("uniform", "weighted"))
    min_clients: int = _f(1, "fewest valid client updates a round needs; with fewer the round fails and the last checkpoint stays", ge=1)


@dataclass
class FlowerConfig:
    client_cpus: float = _f(1.0, "simulation: CPU cores per ClientApp (Ray actor); clients train in parallel up to cores / client_cpus", gt=0)
    client_gpus: float = _f(0.0, "simulation: GPUs per ClientApp (0.25 = four clients share one GPU)", ge=0)
    client_logs: bool = _f(False, "simulation: show the ClientApps' own output (Ray actor logs); their errors are logged either way")
    heldout_path: Optional[str] = _f(
        None, "deployment with node-owned data: the server's held-out set, a data file read with data.columns "
        "(default: the held-out split of data.path, which the server must then be able to read)"
    )
    connect_timeout: float = _f(300.0, "seconds the server waits for SuperNodes to report before round 1", gt=0)
    round_timeout: Optional[float] = _f(None, "seconds to wait for a round's replies (null: until every node replied or is declared offline)", gt=0)


@dataclass
class StrategyConfig:
    name: str = _f("fedavg", "server aggregation strategy", choices=("fedavg",))


@dataclass
class TrainConfig:
    local_epochs: int = _f(1, "passes over the client's shard per round (ignored when local_steps is set)", ge=1)
    local_steps: Optional[int] = _f(None, "optimizer steps per client per round (cycles through the shard)", ge=1)
    batch_size: int = _f(4, "examples per micro-batch", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", ge=1)
    lr: float = _f(2e-4, "peak learning rate", gt=0)
    lr_schedule: str = _f("constant", "learning rate across rounds", choices=("constant", "cosine", "linear"))
    min_lr: float = _f(0.0, "final learning rate for cosine/linear schedules", ge=0)
    warmup_steps: int = _f(0, "linear warm-up steps at the start of each client's local training", ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)", ge=0)
    batching: str = _f("length", "batch by similar length (less padding) or at random", choices=("length", "random"))
    precision: str = _f("auto", "compute precision (auto: bf16 on CUDA if supported, else fp32)", choices=("auto", "fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = _f(False, "trade compute for activation memory")


@dataclass
class EvalConfig:
    every: int = _f(1, "evaluate the global adapter every N rounds (and always after the last)", ge=1)
    batch_size: int = _f(8, "examples per evaluation batch", ge=1)
    sample_prompts: list[str] = _f([], "prompts answered before and after training (default: from the held-out set)")
    num_samples: int = _f(2, "held-out prompts answered before/after when sample_prompts is empty", ge=0)
    max_new_tokens: int = _f(64, "tokens generated per sample answer", ge=1)


@dataclass
class OutputConfig:
    dir: str = _f("runs/run", "run directory (config, metrics, checkpoints, final adapter)")
    overwrite: bool = _f(False, "replace an existing run directory instead of refusing")
    keep_checkpoints: int = _f(2, "newest round checkpoints to keep", ge=1)


@dataclass
class RunConfig:
    seed: int = _f(0, "seed for every random choice (partition, sampling, init, batches)")
    task: str = _f("sft", "what clients train", choices=("sft",))
    model: ModelConfig = _f(ModelConfig(), "base model")
    lora: LoraConfig = _f(LoraConfig(), "LoRA adapter")
    data: DataConfig = _f(DataConfig(), "dataset")
    partition: PartitionConfig = _f(PartitionConfig(), "split across clients")
    federation: FederationConfig = _f(FederationConfig(), "rounds and client sampling")
    flower: FlowerConfig = _f(FlowerConfig(), "the Flower engine (federation.engine=flower)")
    strategy: StrategyConfig = _f(StrategyConfig(), "server aggregation")
    train: TrainConfig = _f(TrainConfig(), "local training on each client")
    eval: EvalConfig = _f(EvalConfig(), "held-out evaluation")
    output: OutputConfig = _f(OutputConfig(), "where results go")


# Keys that may change when resuming a run: they do not affect the math of finished rounds.
RESUMABLE_CHANGES = (
    "federation.rounds", "output.", "eval.every", "eval.batch_size", "eval.max_new_tokens", "federation.engine", "flower.",
)


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            sub: list[str] = []
            out = _coerce(value, arg, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if tp is type(None):
        if value is not None:
            problems.append(f"{key}: expected null, got {value!r}")
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
            return None
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        if not math.isfinite(value):
            problems.append(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # internal


def _check_bounds(value: Any, meta: dict, key: str, problems: list[str]) -> None:
    if value is None or isinstance(value, bool):
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        problems.append(f"{key}: '{value}' is not one of {', '.join(choices)}{extra}")
    if isinstance(value, (int, float)):
        for op, ok, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            if op in meta and not ok(value, meta[op]):
                problems.append(f"{key}: must be {word} {meta[op]}, got {value}")


def _build(cls: type, raw: dict, prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from the dict ``raw``, collecting problems."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            problems.append(f"{full}: unknown key{extra}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{full}: expected a section (mapping), got {value!r}")
                continue
            kwargs[key] = _build(tp, value, f"{full}.", problems)
            continue
        converted = _coerce(value, tp, full, problems)
        _check_bounds(converted, fields[key].metadata, full, problems)
        kwargs[key] = converted
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any, delete: bool = False) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    if delete:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def parse_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` (YAML-parsed value) and ``~a.b`` (back to default) to ``raw``."""
    problems = []
    for item in overrides:
        if item.startswith("~"):
            _set_dotted(raw, item[1:], None, delete=True)
            continue
        if "=" not in item:
            problems.append(f"override '{item}': expected key=value (e.g. federation.rounds=5)")
            continue
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.strip(), value)
    if problems:
        raise ConfigError(problems)
    return raw


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, raising ConfigError with the file name on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass a YAML recipe such as configs/demo.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def from_dict(raw: dict) -> RunConfig:
    """Build and validate a RunConfig from a nested dict; all problems are raised at once."""
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems)
    if not problems:
        problems.extend(cross_checks(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply overrides."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(parse_overrides(raw, list(overrides or [])))


def cross_checks(cfg: RunConfig) -> list[str]:
    """Constraints that involve more than one key."""
    problems = []
    fed, part = cfg.federation, cfg.partition
    if fed.clients_per_round is not None and fed.fraction is not None:
        problems.append("federation.clients_per_round and federation.fraction: set one, not both")
    if fed.clients_per_round is not None and fed.clients_per_round > part.num_clients:
        problems.append(
            f"federation.clients_per_round: {fed.clients_per_round} is more than "
            f"partition.num_clients={part.num_clients}"
        )
    per_round = fed.clients_per_round or (math.ceil(fed.fraction * part.num_clients - 1e-9) if fed.fraction else part.num_clients)
    if fed.min_clients > per_round:
        problems.append(
            f"federation.min_clients: {fed.min_clients} is more than the {per_round} clients a round trains; "
            "lower it or sample more clients per round"
        )
    if cfg.train.min_lr > cfg.train.lr:
        problems.append(f"train.min_lr: {cfg.train.min_lr} is above train.lr={cfg.train.lr}")
    if isinstance(cfg.lora.target_modules, list) and not cfg.lora.target_modules:
        problems.append("lora.target_modules: empty list; use 'all-linear' or name modules such as [q_proj, v_proj]")
    return problems


# ----------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def config_hash(cfg: RunConfig) -> str:
    """A stable hash of the settings that determine the math of a run's rounds."""
    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if not _resumable(k)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_CHANGES)


def resume_differences(saved: RunConfig, given: RunConfig) -> list[str]:
    """Keys whose values differ between a run's saved config and a new one, excluding
    those that may change on resume. Each entry reads ``key (run: a, now: b)``."""
    a, b = flatten(to_dict(saved)), flatten(to_dict(given))
    return [
        f"{k} (run: {a.get(k)!r}, now: {b.get(k)!r})"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not _resumable(k)
    ]


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every setting, for `fedtune config --help`-style listings."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows
