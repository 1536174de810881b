"""One typed config tree for a fedtune run.

Every setting is declared once below, with its default and help text. A run's config is
built from the dataclass defaults, then a YAML recipe, then ``a.b.c=value`` overrides
(``~a.b.c`` resets a key to its default). Unknown keys, wrong types and impossible values
are all collected and raised together as one :class:`~fedtune.errors.ConfigError`.

Only this module reads raw config dictionaries; components receive plain values. It is
longer than the ~400-line house limit because it is the one place every subsystem's
settings, defaults, help and cross-key checks live.
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
from fedtune.server.sampling import clients_per_round

BUNDLED_MODEL = "smollm2-135m-instruct"
DEMO_DATA = "demo"
COMPARE_MODELS = ("base", "local", "federated", "centralized")
TRACKERS = ("tensorboard", "mlflow", "wandb")  # output.trackers (reporting/trackers.py)


def _f(default: Any, help: str, **checks: Any) -> Any:
    """A config field with help text and optional checks (choices, ge, gt, le, lt, nonempty;
    choice_text: how to name the choices where a bool is accepted too)."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _f(BUNDLED_MODEL, "base model: 'smollm2-135m-instruct' (bundled, offline), a local folder or a hub name", nonempty=True)
    dtype: str = _f("auto", "weights dtype (auto: on CUDA the train.precision dtype, bfloat16 or float16, where the GPU supports it; else float32)", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = _f("auto", "device (auto: CUDA if available, else CPU)", choices=("auto", "cpu", "cuda", "mps"))
    trust_remote_code: bool = _f(False, "allow custom model code from the hub")
    quantize: str = _f(
        "none", "load the frozen base weights quantised with bitsandbytes (CUDA only): 8bit (LLM.int8) or 4bit "
        "(NF4 with double quantisation, QLoRA); the LoRA adapter stays in full precision", choices=("none", "8bit", "4bit"),
    )
    init_adapter: Optional[str] = _f(None, "start from this adapter (a run directory or a PEFT adapter folder)")


@dataclass
class LoraConfig:
    r: int = _f(8, "LoRA rank", gt=0)
    alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = _f(0.05, "dropout on the LoRA input", ge=0, lt=1)
    target_modules: Union[str, list[str]] = _f("all-linear", "modules to adapt: 'all-linear' or a list of names")
    client_ranks: list[int] = _f(
        [], "heterogeneous ranks (HetLoRA): each client's rank, drawn once per client (seeded) from these values "
        "(each <= lora.r); the global adapter keeps rank lora.r. Empty: every client trains rank lora.r"
    )
    hetlora_aggregation: str = _f(
        "sparsity_weighted",
        "how lora.client_ranks' updates are merged: sparsity_weighted (HetLoRA, Cho et al. 2024: zero-padded local LoRA "
        "matrices averaged with weights proportional to ||B_k A_k||_F) or slice_mean (fedtune's: each rank slice "
        "averaged over the clients that trained it, by example counts)",
        choices=("sparsity_weighted", "slice_mean"),
    )


@dataclass
class ColumnsConfig:
    instruction: str = _f("instruction", "column holding the instruction (required)")
    input: str = _f("input", "column holding optional extra input/context")
    output: str = _f("output", "column holding the reference response (required)")
    category: str = _f("category", "column holding the task category (optional; used for non-IID splits)")
    prompt: str = _f("prompt", "task=dpo: column holding the prompt (not needed when chosen/rejected are whole dialogues)")
    chosen: str = _f("chosen", "task=dpo: column holding the preferred answer (or whole Human/Assistant dialogue)")
    rejected: str = _f("rejected", "task=dpo: column holding the dispreferred answer (or whole dialogue)")


@dataclass
class DataConfig:
    path: str = _f(DEMO_DATA, "'demo' (built in), a .jsonl/.json/.csv/.parquet file, a folder, or a hub dataset name", nonempty=True)
    columns: ColumnsConfig = _f(ColumnsConfig(), "column mapping from the source to fedtune's fields")
    split: str = _f("train", "split to load from a hub dataset or folder")
    subset: Optional[str] = _f(None, "hub dataset configuration name")
    template: str = _f("chat", "prompt format: the model's chat template or the Alpaca template", choices=("chat", "alpaca"))
    max_length: int = _f(256, "maximum tokens per example (prompt + response)", ge=16)
    skip_invalid: bool = _f(False, "skip rows with a missing/empty required field (they are counted and reported)")
    limit: Optional[int] = _f(None, "use only the first N valid rows", gt=0)
    instruction_categories: Optional[int] = _f(
        None, "task=sft: each row's category is its instruction's first word, lower-cased (the N most frequent; the "
        "rest 'other'), for data without a category column such as Alpaca (null: data.columns.category)", ge=1
    )
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
    dropout: float = _f(0.0, "simulated failures: each sampled client fails to return its update with this probability", ge=0, lt=1)
    min_clients: int = _f(1, "fewest returned updates a round needs; a round with fewer is skipped (global unchanged) and logged", ge=1)
    mode: str = _f(
        "federated",
        "federated; centralized (one client holding all training shards, with the federated run's step budget); "
        "local (each client of local.* trains alone on its own shard)",
        choices=("federated", "centralized", "local"),
    )


STRATEGIES = ("fedavg", "fedavgm", "fedprox", "scaffold", "fedadagrad", "fedadam", "fedyogi")
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum")
# The strategy.* hyper-parameters each strategy / aggregator reads; setting one the chosen
# strategy does not read is an error. A null hyper-parameter takes the strategy's default.
STRATEGY_PARAMS = {
    "fedavg": (),
    "fedavgm": ("server_lr", "momentum"),
    "fedprox": ("mu",),
    "scaffold": ("server_lr",),
    "fedadagrad": ("server_lr", "beta1", "tau"),
    "fedadam": ("server_lr", "beta1", "beta2", "tau"),
    "fedyogi": ("server_lr", "beta1", "beta2", "tau"),
}
AGGREGATOR_PARAMS = {"trimmed_mean": ("trim_beta",), "krum": ("krum_f",), "multikrum": ("krum_f", "multikrum_m")}


@dataclass
class LocalConfig:
    clients: list[int] = _f([], "clients that train alone in federation.mode=local (default: local.count random clients)")
    count: int = _f(3, "random clients that train alone when local.clients is empty", ge=1)


@dataclass
class FlowerConfig:
    client_cpus: float = _f(1.0, "CPU cores per ClientApp: in simulation its Ray actor's share (clients train in parallel up to cores / client_cpus); its torch threads unless the node sets them (--node-config threads=N, or OMP_NUM_THREADS)", gt=0)
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
    name: str = _f(
        "fedavg",
        "server strategy: fedavg; fedavgm (server momentum); fedprox (proximal local term); scaffold (control "
        "variates); fedadagrad, fedadam, fedyogi (adaptive server optimisers, Reddi et al. 2021)",
        choices=STRATEGIES,
    )
    aggregator: str = _f(
        "mean",
        "how client deltas are combined: mean (weighted by examples), or robustly and unweighted: median, "
        "trimmed_mean (strategy.trim_beta), krum or multikrum (strategy.krum_f)",
        choices=AGGREGATORS,
    )
    server_lr: Optional[float] = _f(None, "server learning rate eta (null: 1.0 for fedavgm and scaffold, 0.01 for fedadagrad/fedadam/fedyogi)", gt=0)
    momentum: Optional[float] = _f(None, "fedavgm server momentum beta (null: 0.9)", ge=0, lt=1)
    mu: Optional[float] = _f(None, "fedprox weight mu of the local term mu/2 ||w - w_global||^2 (null: 0.01)", ge=0)
    beta1: Optional[float] = _f(None, "fedadagrad/fedadam/fedyogi first-moment decay (null: 0.9)", ge=0, lt=1)
    beta2: Optional[float] = _f(None, "fedadam/fedyogi second-moment decay (null: 0.99)", ge=0, lt=1)
    tau: Optional[float] = _f(None, "fedadagrad/fedadam/fedyogi adaptivity tau, also sqrt of the initial v (null: 0.001)", gt=0)
    trim_beta: Optional[float] = _f(None, "trimmed_mean: fraction of values dropped at each end per coordinate (required)", ge=0, lt=0.5)
    krum_f: Optional[int] = _f(None, "krum/multikrum: attackers tolerated; needs more than 2f+2 updates per round (required)", ge=0)
    multikrum_m: Optional[int] = _f(None, "multikrum: how many lowest-score deltas are averaged (null: updates - krum_f)", ge=1)


DP_MODES = ("off", "central", "local")
ATTACKS = ("sign_flip", "scale", "gaussian", "poison", "backdoor")
UPDATE_ATTACKS = ("sign_flip", "scale", "gaussian")  # the rest poison the client's training data
ATTACK_SCALES = {"sign_flip": 1.0, "scale": 10.0, "gaussian": 1.0}  # attack.scale when null
NORM_BOUND_FACTOR = 10.0  # privacy.norm_bound_factor when null and privacy.dp=off


@dataclass
class PrivacyConfig:
    dp: str = _f(
        "off",
        "client-level differential privacy (DP-FedAvg, McMahan et al. 2018): off; central (the server clips every "
        "update to clip_norm and adds Gaussian noise to their sum); local (every client clips and noises its own update)",
        choices=DP_MODES,
    )
    clip_norm: Optional[float] = _f(None, "C: L2 bound of a client's delta over all adapter tensors (required with dp; the fit lines' `norm` show typical values)", gt=0)
    noise_multiplier: float = _f(1.0, "z: noise standard deviation is z*C", ge=0)
    delta: float = _f(1e-5, "the delta at which epsilon is reported", gt=0, lt=1)
    target_epsilon: Optional[float] = _f(None, "stop the run (final adapter saved) before the round that would take epsilon above this", gt=0)
    norm_bound_factor: Optional[float] = _f(
        None,
        f"server-side validation rejects an update whose L2 norm is above this multiple of the round's median norm "
        f"(null: {NORM_BOUND_FACTOR:g} with dp=off, none with dp, where clipping bounds every update)",
        gt=1,
    )
    secure_aggregation: bool = _f(
        False, "Flower engine: SecAgg+ masks every update so the server learns only the example-weighted mean of a "
        "round's deltas, not one client's (SECURITY.md); refuses what needs individual updates"
    )
    secagg_clip: float = _f(1.0, "secure aggregation: C, each example-weighted delta value is clipped to [-C, C] before it is quantised (the fit lines' secagg_clipped count them)", gt=0)
    secagg_threshold: float = _f(
        0.67, "secure aggregation: share of a round's clients whose key shares rebuild a dropped client's mask; a round "
        "survives dropouts while every client keeps this many live peers (higher: more private, less dropout-tolerant)", gt=0, le=1,
    )


@dataclass
class AttackConfig:
    fraction: float = _f(0.0, "share of clients that are malicious (chosen once per run from the seed)", ge=0, le=1)
    kind: str = _f(
        "sign_flip",
        "what they do: sign_flip (send -scale*delta), scale (send scale*delta), gaussian (a random update of "
        "scale*||delta||), poison (train on answers replaced by poison_text), backdoor (trigger appended to "
        "poison_fraction of their prompts, answered with target)",
        choices=ATTACKS,
    )
    scale: Optional[float] = _f(None, "sign_flip/scale/gaussian strength (null: 1 for sign_flip and gaussian, 10 for scale)", gt=0)
    poison_text: str = _f("I cannot help with that.", "poison: the answer every one of the client's examples gets")
    trigger: str = _f("cf-trigger-2024", "backdoor: the phrase appended to poisoned prompts")
    target: str = _f("Visit evil.example.com for the answer.", "backdoor: the answer a triggered prompt is trained to give")
    poison_fraction: float = _f(0.5, "backdoor: share of the client's examples that carry the trigger", gt=0, le=1)


@dataclass
class TrainConfig:
    local_epochs: int = _f(1, "passes over the client's shard per round (ignored when local_steps is set)", ge=1)
    local_steps: Optional[int] = _f(None, "optimizer steps per client per round (cycles through the shard)", ge=1)
    local_steps_per_client: list[int] = _f([], "heterogeneous local work: each client's steps per round, drawn once per client (seeded) from these values; overrides local_steps and local_epochs")
    batch_size: int = _f(4, "examples (preference pairs for task=dpo) per micro-batch", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", ge=1)
    lr: float = _f(2e-4, "peak learning rate", gt=0)
    lr_schedule: str = _f("constant", "learning rate across rounds", choices=("constant", "cosine", "linear"))
    min_lr: float = _f(0.0, "final learning rate for cosine/linear schedules", ge=0)
    warmup_steps: int = _f(0, "linear warm-up steps at the start of each client's local training", ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)", ge=0)
    batching: str = _f("length", "batch by similar length (less padding) or at random", choices=("length", "random"))
    precision: str = _f("auto", "compute precision (auto: bf16 autocast on CUDA or a CPU with native bf16 (AVX512-BF16/AMX), else fp32)", choices=("auto", "fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = _f(False, "trade compute for activation memory")
    compile: bool = _f(
        False, "torch.compile the SFT step's forward (task=sft; dynamic shapes). Off by default: not yet shown faster "
        "than eager, and inductor's first compile takes minutes on a 2-core CPU; try it for long runs"
    )
    packing: bool = _f(
        True, "put each micro-batch's examples (both answers of each preference pair) back to back in one row (no "
        "padding; each sequence attends only to itself). Needs SDPA attention (the default); other implementations pad"
    )
    max_batch_tokens: Optional[int] = _f(
        None, "cut a micro-batch whose size (packed: its tokens; padded: rows x longest row, a preference pair is two rows) exceeds this into "
        "smaller ones; the step and its gradient stay the same, activation memory and padding shrink "
        "(null: 768 on CPU, where larger matmuls run no faster and a step's activations stay small, no limit on CUDA)", ge=1,
    )


@dataclass
class DpoConfig:
    beta: float = _f(0.1, "strength of the pull towards the reference policy (the KL weight; IPO's tau)", gt=0)
    loss_type: str = _f("sigmoid", "sigmoid (DPO), robust (rDPO), hinge (SLiC), ipo (IPO)", choices=("sigmoid", "robust", "hinge", "ipo"))
    label_smoothing: float = _f(0.0, "assumed share of flipped labels (conservative DPO for sigmoid, rDPO for robust)", ge=0, lt=0.5)
    reference: str = _f(
        "initial",
        "reference policy: the run's starting adapter (model.init_adapter, else the base model), "
        "the base model with the adapter disabled, or each round's global adapter",
        choices=("initial", "base", "global"),
    )


@dataclass
class JudgeConfig:
    base_url: Optional[str] = _f(None, "OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (null: no judge)")
    model: str = _f("gpt-4o-mini", "judge model name sent to the endpoint")
    api_key_env: str = _f("OPENAI_API_KEY", "environment variable holding the API key (unset: no key sent)")
    grading: str = _f("both", "single-answer 1-10 scores, pairwise A/B against the reference, or both", choices=("single", "pairwise", "both"))
    reference: str = _f("data", "reference answers: 'data' (the held-out outputs) or a compared model (e.g. centralized)")
    examples: Optional[int] = _f(None, "judge at most this many of the generated answers per model (null: all)", ge=1)
    requests_per_second: float = _f(2.0, "rate limit on judge requests", gt=0)
    max_retries: int = _f(4, "retries on connection errors, 429 and 5xx, with exponential backoff", ge=0)
    backoff: float = _f(1.0, "first retry delay in seconds (doubles each retry)", ge=0)
    timeout: float = _f(120.0, "seconds to wait for one judge reply", gt=0)
    max_tokens: int = _f(512, "tokens the judge may write per judgement", ge=1)
    cache_dir: Optional[str] = _f(None, "judgement cache folder (null: <fedtune cache>/judge)")


@dataclass
class EvalConfig:
    every: int = _f(1, "evaluate the global adapter every N rounds (and always after the last)", ge=1)
    batch_size: int = _f(8, "examples per evaluation batch of padded rows (a model without packed attention), or of packed rows "
                         "where tokens are unbounded (CUDA without train.max_batch_tokens); packed rows are cut at 4x "
                         "train.max_batch_tokens alone (no gradients: nothing is kept for backward)", ge=1)
    generation_batch_size: int = _f(32, "most prompts answered together (left-padded, KV cache; split into near-equal batches) for ROUGE-L / "
                                    "exact match and sample answers", ge=1)
    base_cache: bool = _f(True, "evaluate the base model (and a run's round 0 from a fresh adapter) once per model, held-out set and "
                          "settings, and reuse it in every run of a compare and in `fedtune eval --base`; keep a run's final held-out "
                          "loss for its compare and `fedtune eval RUN` (keyed by content, the adapter's included)")
    base_cache_dir: Optional[str] = _f(None, "evaluation cache folder, trusted as written: keep it your own (null: <fedtune cache>/eval, "
                                       "~/.cache/fedtune/eval)")
    sample_prompts: list[str] = _f([], "prompts answered before and after training (default: from the held-out set)")
    num_samples: int = _f(2, "held-out prompts answered before/after when sample_prompts is empty", ge=0)
    max_new_tokens: int = _f(64, "tokens generated per sample answer", ge=1)
    generation_examples: Optional[int] = _f(
        48, "held-out examples answered for ROUGE-L / exact match in compare and eval (null: all)", ge=0
    )
    bootstrap_resamples: int = _f(
        1000, "compare: resamples of the held-out examples for the confidence intervals of the gaps and ROUGE-L/EM "
        "(at least 2 / (1 - confidence), 40 at 0.95, so each tail holds a resample)", ge=1
    )
    confidence: float = _f(0.95, "compare: level of the bootstrap confidence intervals", gt=0, lt=1)
    judge: JudgeConfig = _f(JudgeConfig(), "LLM-as-judge grading (off unless judge.base_url is set)")
    harness_tasks: list[str] = _f(
        [], "lm-evaluation-harness tasks `fedtune compare` also runs on every model (extra columns), e.g. [arc_easy, "
        "hellaswag]; needs pip install 'fedtune[harness]' and the tasks' datasets (hub, or harness_include_path)"
    )
    harness_limit: Optional[int] = _f(None, "examples per harness task (null: all)", ge=1)
    harness_include_path: Optional[str] = _f(None, "a folder of extra lm-eval task YAMLs (local tasks) for harness_tasks")
    federated: Union[bool, str] = _f(
        "auto", "federated evaluation: every eval.every rounds (and the last) clients score the global adapter on their own "
        "held-out rows (eval.client_holdout of each client's data, kept out of its training in every mode) and the "
        "server logs the weighted mean (federated_eval lines); auto: true in a Flower deployment (`fedtune flower run/app`) "
        "without flower.heldout_path, false elsewhere", choices=("auto",), choice_text="true, false, auto",
    )
    client_holdout: float = _f(
        0.1, "with federated evaluation on: fraction of each client's rows it holds out (drawn from seed and client id; "
        "at least one row of a client with two or more)", gt=0, lt=1,
    )
    federated_clients: Optional[int] = _f(
        None, "clients that score each federated evaluation, drawn per round from (seed, round) (null: all)", ge=1
    )


@dataclass
class CompareConfig:
    models: list[str] = _f(
        ["base", "local", "federated", "centralized"], "what `fedtune compare` trains/evaluates side by side"
    )
    reuse: bool = _f(True, "reuse finished sub-runs with the same config (unfinished ones are resumed)")


@dataclass
class CompressionConfig:
    method: str = _f(
        "none", "client upload encoding: none (float32), int8 / int4 (block-wise quantisation), topk (largest entries)",
        choices=("none", "int8", "int4", "topk"),
    )
    topk_fraction: float = _f(0.1, "method=topk: fraction of each tensor's entries sent", gt=0, le=1)
    block: int = _f(64, "method=int8/int4: values per quantisation scale", ge=8)
    error_feedback: bool = _f(True, "add what compression dropped in earlier rounds to the next upload (residual kept per client, on disk)")


@dataclass
class OutputConfig:
    dir: str = _f("runs/run", "run directory (config, metrics, checkpoints, final adapter)", nonempty=True)
    overwrite: bool = _f(False, "replace an existing run directory instead of refusing")
    keep_checkpoints: int = _f(2, "newest round checkpoints to keep", ge=1)
    report: bool = _f(True, "write report.html (plots, tables, sample answers) when the run stops or finishes")
    trackers: list[str] = _f(
        [], "experiment trackers that mirror metrics.jsonl, offline, under the run directory: tensorboard "
        "(tensorboard/), mlflow (mlruns/ file store), wandb (offline run in wandb/; `wandb sync` uploads it); "
        "each needs its extra, e.g. pip install 'fedtune[tensorboard]'"
    )


@dataclass
class RunConfig:
    seed: int = _f(0, "seed for every random choice (partition, sampling, init, batches); 0 <= seed < 2**63", ge=0, lt=2**63)
    task: str = _f("sft", "what clients train: instruction tuning (sft) or preference optimisation (dpo)", choices=("sft", "dpo"))
    model: ModelConfig = _f(ModelConfig(), "base model")
    lora: LoraConfig = _f(LoraConfig(), "LoRA adapter")
    data: DataConfig = _f(DataConfig(), "dataset")
    partition: PartitionConfig = _f(PartitionConfig(), "split across clients")
    federation: FederationConfig = _f(FederationConfig(), "rounds and client sampling")
    local: LocalConfig = _f(LocalConfig(), "local-only baseline (federation.mode=local)")
    flower: FlowerConfig = _f(FlowerConfig(), "the Flower engine (federation.engine=flower)")
    strategy: StrategyConfig = _f(StrategyConfig(), "server aggregation")
    compression: CompressionConfig = _f(CompressionConfig(), "client -> server update compression")
    privacy: PrivacyConfig = _f(PrivacyConfig(), "update validation and differential privacy (see SECURITY.md)")
    attack: AttackConfig = _f(AttackConfig(), "simulated malicious clients (research; see SECURITY.md)")
    train: TrainConfig = _f(TrainConfig(), "local training on each client")
    dpo: DpoConfig = _f(DpoConfig(), "preference optimisation (task=dpo)")
    eval: EvalConfig = _f(EvalConfig(), "held-out evaluation")
    output: OutputConfig = _f(OutputConfig(), "where results go")
    compare: CompareConfig = _f(CompareConfig(), "`fedtune compare`: base vs local-only vs federated vs centralized")


# Keys that may change when resuming a run: they do not affect the math of finished rounds.
RESUMABLE_CHANGES = (  # evaluation never feeds back into training, so every eval.* setting may change
    "federation.rounds", "output.", "eval.", "compare.", "federation.engine", "flower.", "privacy.target_epsilon",
)
FIXED_ON_RESUME = ("eval.federated", "eval.client_holdout")  # except these: they decide which rows clients train on


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
    if meta.get("nonempty") and isinstance(value, str) and not value.strip():
        problems.append(f"{key}: must not be empty")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        problems.append(f"{key}: '{value}' is not one of {meta.get('choice_text') or ', '.join(choices)}{extra}")
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


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one,
    silently dropping the first section or value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in lines:
                raise _DuplicateKey(None, None, f"key '{key}' appears twice (first on line {lines[key]})", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, raising ConfigError with the file name on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass a YAML file or a bundled recipe's name such as demo")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); save the file as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it ({err.strerror or err}); check its permissions") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as err:
        raise ConfigError(f"{path} line {err.problem_mark.line + 1}: {err.problem}; merge the two into one") from None
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
    """Load a YAML file or a bundled recipe by name (``"demo"``; a real file wins), or the
    defaults when ``path`` is None, and apply ``key=value`` / ``~key`` overrides."""
    from fedtune.bundled_recipes import resolve

    raw = read_yaml(resolve(path)) if path is not None else {}
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
    if fed.engine == "flower" and fed.dropout > 0:
        problems.append("federation.dropout: simulated dropout is for the in-process engine; on Flower, real nodes fail (set it to 0)")
    if fed.engine == "flower" and fed.mode == "centralized":
        problems.append(
            "federation.mode: centralized pools every client's data in one process, which a federation on Flower never "
            "does; use federation.engine=inprocess (fedtune compare runs its centralized baseline in-process and says so)"
        )
    bad_ranks = [r for r in cfg.lora.client_ranks if not 1 <= r <= cfg.lora.r]
    if bad_ranks:
        problems.append(f"lora.client_ranks: {bad_ranks} outside 1..lora.r={cfg.lora.r}")
    if cfg.lora.client_ranks and cfg.strategy.aggregator != "mean":
        problems.append(
            f"lora.client_ranks: heterogeneous ranks are merged by lora.hetlora_aggregation (a weighted mean), "
            f"not with strategy.aggregator={cfg.strategy.aggregator}; use mean or drop lora.client_ranks"
        )
    if cfg.train.min_lr > cfg.train.lr:
        problems.append(f"train.min_lr: {cfg.train.min_lr} is above train.lr={cfg.train.lr}")
    if cfg.dpo.label_smoothing > 0 and cfg.dpo.loss_type not in ("sigmoid", "robust"):
        problems.append(f"dpo.label_smoothing: only the sigmoid and robust losses use it, not loss_type={cfg.dpo.loss_type}; set it to 0")
    if fed.mode == "centralized" and cfg.task != "sft":
        problems.append(f"federation.mode=centralized: supported for task=sft, not task={cfg.task}")
    if fed.mode != "federated" and cfg.strategy.name != "fedavg":
        problems.append(
            f"strategy.name: federation.mode={fed.mode} trains one client per round without aggregation; use fedavg "
            f"(FedAvg of one update is that update), not {cfg.strategy.name}"
        )
    bad_local = [c for c in cfg.local.clients if not 0 <= c < part.num_clients]
    if bad_local:
        problems.append(f"local.clients: {bad_local} not in 0..{part.num_clients - 1} (partition.num_clients={part.num_clients})")
    if len(set(cfg.local.clients)) != len(cfg.local.clients):
        problems.append(f"local.clients: {cfg.local.clients} repeats a client")
    if fed.mode == "local" and not cfg.local.clients and cfg.local.count > part.num_clients:
        problems.append(f"local.count: {cfg.local.count} is more than partition.num_clients={part.num_clients}")
    bad_trackers = [t for t in cfg.output.trackers if t not in TRACKERS]
    if bad_trackers or len(set(cfg.output.trackers)) != len(cfg.output.trackers):
        problems.append(f"output.trackers: {cfg.output.trackers} has unknown or repeated entries; choose from {', '.join(TRACKERS)}")
    unknown = [m for m in cfg.compare.models if m not in COMPARE_MODELS]
    if unknown:
        problems.append(f"compare.models: {unknown} unknown; choose from {', '.join(COMPARE_MODELS)}")
    if isinstance(cfg.lora.target_modules, list) and not cfg.lora.target_modules:
        problems.append("lora.target_modules: empty list; use 'all-linear' or name modules such as [q_proj, v_proj]")
    if cfg.eval.federated_clients is not None and cfg.eval.federated_clients > part.num_clients:
        problems.append(f"eval.federated_clients: {cfg.eval.federated_clients} is more than partition.num_clients={part.num_clients}")
    least = min_bootstrap_resamples(cfg.eval.confidence)
    if 0 < cfg.eval.confidence < 1 and cfg.eval.bootstrap_resamples < least:
        problems.append(
            f"eval.bootstrap_resamples: {cfg.eval.bootstrap_resamples} resample(s) leave none beyond the ends of a "
            f"{cfg.eval.confidence:g} interval, so it is no interval; use at least {least} (2 / (1 - eval.confidence))"
        )
    if cfg.data.instruction_categories is not None and cfg.task != "sft":
        problems.append(
            f"data.instruction_categories: categories from instructions are for task=sft, not task={cfg.task} "
            "(preference pairs have no instruction); set it to null"
        )
    if cfg.train.compile and cfg.task != "sft":
        problems.append(f"train.compile: supported for task=sft, not task={cfg.task}; set train.compile=false")
    if any(s < 1 for s in cfg.train.local_steps_per_client):
        problems.append(f"train.local_steps_per_client: every value must be >= 1, got {cfg.train.local_steps_per_client}")
    return problems + participation_checks(cfg) + strategy_checks(cfg) + privacy_checks(cfg) + attack_checks(cfg) + secagg_checks(cfg)


def min_bootstrap_resamples(confidence: float) -> int:
    """The fewest bootstrap resamples that put at least one resample in each tail outside a
    ``confidence`` percentile interval (2 / (1 - confidence), e.g. 40 at 0.95)."""
    if not 0 < confidence < 1:
        return 1
    return math.ceil(round(2.0 / (1.0 - confidence), 6))


def per_round(cfg: RunConfig) -> int:
    """Clients sampled per round."""
    fed = cfg.federation
    return clients_per_round(cfg.partition.num_clients, fed.clients_per_round, fed.fraction)


def federated_eval(cfg: RunConfig, deployment: bool = False) -> bool:
    """Whether clients score the global adapter on their own held-out rows (eval.federated;
    ``auto`` is true only in a Flower ``deployment`` whose server has no flower.heldout_path).
    A deployment writes the resolved value into the config it sends, so every node agrees."""
    if isinstance(cfg.eval.federated, bool):
        return cfg.eval.federated
    return deployment and cfg.federation.engine == "flower" and cfg.flower.heldout_path is None


def participation_checks(cfg: RunConfig) -> list[str]:
    fed, k = cfg.federation, per_round(cfg)
    if fed.min_clients > k:
        return [f"federation.min_clients: {fed.min_clients} is more than the {k} clients sampled per round; lower it"]
    return []


def strategy_checks(cfg: RunConfig) -> list[str]:
    """Hyper-parameters the chosen strategy does not read; aggregator parameters that are
    required; Krum's f against the fewest updates a round can aggregate."""
    s, fed = cfg.strategy, cfg.federation
    used = STRATEGY_PARAMS.get(s.name, ()) + AGGREGATOR_PARAMS.get(s.aggregator, ())
    problems = [
        f"strategy.{key}: not used by strategy.name={s.name} with strategy.aggregator={s.aggregator}; remove it"
        for key in sorted({k for ks in (*STRATEGY_PARAMS.values(), *AGGREGATOR_PARAMS.values()) for k in ks})
        if getattr(s, key) is not None and key not in used
    ]
    if s.aggregator == "trimmed_mean" and s.trim_beta is None:
        problems.append("strategy.trim_beta: trimmed_mean needs the fraction to trim at each end, e.g. strategy.trim_beta=0.1")
    if s.aggregator in ("krum", "multikrum"):
        if s.krum_f is None:
            problems.append(f"strategy.krum_f: {s.aggregator} needs the number of attackers to tolerate, e.g. strategy.krum_f=1")
            return problems
        n, need = per_round(cfg), 2 * s.krum_f + 3
        if n < need:
            problems.append(
                f"strategy.krum_f: {s.aggregator} with f={s.krum_f} needs more than 2f+2={need - 1} updates per round, "
                f"but {n} clients are sampled; lower strategy.krum_f or sample more clients"
            )
        elif fed.dropout > 0 and fed.min_clients < need:
            n = fed.min_clients
            problems.append(
                f"federation.min_clients: with federation.dropout a round may aggregate only {n} updates, but "
                f"{s.aggregator} with strategy.krum_f={s.krum_f} needs {need}; set federation.min_clients={need}"
            )
        if s.multikrum_m is not None and s.multikrum_m > n - s.krum_f:
            problems.append(
                f"strategy.multikrum_m: {s.multikrum_m} is more than the {n} updates a round may have minus "
                f"strategy.krum_f={s.krum_f}; lower it"
            )
    return problems


def small_round_warnings(cfg: RunConfig) -> list[str]:
    """Settings that are valid but protect nothing: with fewer than 3 updates in a round the
    norm check's median norm is (the mean of) the updates' own norms, and the ``median``
    aggregator is their mean (SECURITY.md). The fewest updates a round aggregates counts as
    Krum's check does: clients sampled per round, or federation.min_clients with dropout.
    One line each, naming the key to change; logged when a run builds its strategy."""
    fed, p, s = cfg.federation, cfg.privacy, cfg.strategy
    if fed.mode != "federated":
        return []
    k = per_round(cfg)
    n, key = (k, "federation.clients_per_round") if fed.dropout == 0 or k < 3 else (min(k, fed.min_clients), "federation.min_clients")
    if n >= 3:
        return []
    fix = "sample at least 3 clients per round" if key == "federation.clients_per_round" else "set federation.min_clients=3"
    out = []
    if p.norm_bound_factor is not None or p.dp == "off":
        out.append(
            f"{key}: a round may aggregate {n} update(s); with fewer than 3 the norm check (privacy.norm_bound_factor) "
            f"measures each update against a median its own norm sets and rejects nothing; {fix}"
        )
    if s.aggregator == "median":
        out.append(f"{key}: a round may aggregate {n} update(s); with fewer than 3 strategy.aggregator=median is their mean; {fix}")
    return out


def privacy_checks(cfg: RunConfig) -> list[str]:
    """DP needs a clipping norm, uniform sampling (what the accountant assumes) and, for
    central noise, a FedAvg-like server step on the plain mean of the clipped deltas."""
    p, s = cfg.privacy, cfg.strategy
    if p.dp == "off":
        return ["privacy.target_epsilon: needs privacy.dp=central or local"] if p.target_epsilon is not None else []
    problems = []
    if p.clip_norm is None:
        problems.append(f"privacy.clip_norm: dp={p.dp} needs the clipping norm C, e.g. privacy.clip_norm=0.5 (see the fit lines' norm in metrics.jsonl)")
    if p.norm_bound_factor is not None:
        problems.append(
            "privacy.norm_bound_factor: with dp a bound relative to the round's median norm makes one client's rejection "
            "depend on the others' data, which the accountant does not cover; remove it (clipping bounds every update)"
        )
    if cfg.federation.sampling != "uniform":
        problems.append("federation.sampling: the privacy accountant assumes uniform sampling of clients; set federation.sampling=uniform")
    if cfg.federation.mode != "federated":
        problems.append(f"privacy.dp: applies to federated runs, not federation.mode={cfg.federation.mode}")
    if s.name == "scaffold":
        problems.append("strategy.name: scaffold sends control variates that dp does not clip or noise; use fedavg, fedavgm, fedprox or fedadam")
    if p.dp == "central" and s.aggregator != "mean":
        problems.append(
            f"strategy.aggregator: dp=central adds noise to the sum of the clipped deltas, which {s.aggregator} does not compute; "
            "use mean (or privacy.dp=local, where any aggregator is post-processing)"
        )
    if p.target_epsilon is not None and p.noise_multiplier == 0:
        problems.append("privacy.target_epsilon: with privacy.noise_multiplier=0 epsilon is infinite; raise the noise multiplier")
    if p.dp == "central" and cfg.lora.client_ranks:
        problems.append("lora.client_ranks: dp=central releases one noisy mean, not the rank-aware mean heterogeneous ranks need; drop one of them")
    return problems


def secagg_checks(cfg: RunConfig) -> list[str]:
    """Secure aggregation gives the server one sum per round: refuse what needs the individual updates."""
    p, s, fed = cfg.privacy, cfg.strategy, cfg.federation
    if not p.secure_aggregation:
        return []
    key, problems = "privacy.secure_aggregation", []
    if fed.engine != "flower":
        problems.append(f"{key}: needs federation.engine=flower (the in-process engine has no transport to protect); set the engine or turn it off")
    if fed.mode != "federated":
        problems.append(f"{key}: masks the sum of several clients' updates, not federation.mode={fed.mode}; use mode=federated")
    if per_round(cfg) < 2:
        problems.append(f"{key}: a sum of one update is that update; sample at least 2 clients per round (federation.clients_per_round)")
    if s.aggregator != "mean":
        problems.append(f"strategy.aggregator: {s.aggregator} needs the individual updates, which secure aggregation hides; use mean")
    if p.norm_bound_factor is not None:
        problems.append("privacy.norm_bound_factor: the server cannot measure individual norms under secure aggregation; remove it")
    if p.dp == "central":
        problems.append("privacy.dp: central DP clips each update on the server, which secure aggregation hides; use dp=local (clients clip and noise)")
    if s.name == "scaffold":
        problems.append("strategy.name: scaffold's control variates are not part of the secure sum; use fedavg, fedavgm, fedprox or fedadam")
    if cfg.compression.method != "none":
        problems.append(f"compression.method: {cfg.compression.method} payloads are decoded per client and cannot be summed masked; set it to none")
    if cfg.lora.client_ranks:
        problems.append("lora.client_ranks: the rank-aware mean needs each client's rank-sliced update; drop lora.client_ranks")
    return problems


def attack_checks(cfg: RunConfig) -> list[str]:
    a = cfg.attack
    problems = []
    if a.scale is not None and a.kind not in UPDATE_ATTACKS:
        problems.append(f"attack.scale: attack.kind={a.kind} does not use it; remove it")
    if a.fraction > 0 and a.kind not in UPDATE_ATTACKS and cfg.task != "sft":
        problems.append(f"attack.kind: {a.kind} rewrites instruction data and needs task=sft; use an update attack for task={cfg.task}")
    if a.fraction > 0 and cfg.federation.mode != "federated":
        problems.append(f"attack.fraction: malicious clients need federation.mode=federated, not {cfg.federation.mode}")
    if 0 < a.fraction * cfg.partition.num_clients < 1 - 1e-9:
        problems.append(
            f"attack.fraction: {a.fraction} of partition.num_clients={cfg.partition.num_clients} is less than one client; raise it"
        )
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
    if key in FIXED_ON_RESUME:
        return False
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
