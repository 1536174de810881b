"""One loader for every folder ``generate``, ``serve``, ``eval`` and ``export`` accept:

* a **run directory** (``config.yaml``): its final adapter, else its newest checkpoint, on the
  run's base model, as the run built it (``setup.load_run_model``);
* a **PEFT adapter folder** (``adapter_config.json``): a run's ``adapter/`` copied anywhere, or
  any LoRA adapter. Its base is the local folder ``fedtune.json`` recorded when that exists
  here, else the bundled model when it was trained on that, else ``base_model_name_or_path``
  (a folder, or a hub id loaded from the Hugging Face cache or the hub);
* a **merged model folder** (``config.json`` and weights): ``fedtune export --format hf`` or
  any causal LM saved with ``save_pretrained``.

The prompt template is the run's ``data.template``, else the one ``fedtune.json`` records,
else ``chat`` when the tokenizer has a chat template and ``alpaca`` otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from fedtune.config import BUNDLED_MODEL, RunConfig
from fedtune.errors import CheckpointError, ConfigError, ModelError
from fedtune.federation.rundir import CONFIG_FILE
from fedtune.federation.setup import ModelBundle, load_run_model, resolve_precision
from fedtune.federation.sharing import read_share_record
from fedtune.model.base import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path
from fedtune.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_parameters, get_adapter, set_adapter, zeros_like

RUN, ADAPTER, MERGED = "run", "adapter", "merged"
MODEL_CONFIG = "config.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    """A model ready to answer: ``model`` is a PeftModel (run, adapter) or a plain causal LM (merged)."""

    kind: str  # RUN, ADAPTER or MERGED
    folder: Path  # the adapter folder (for a run: its adapter/ or newest checkpoint) or the model folder
    bundle: ModelBundle  # model, tokenizer, LoRA parameters (empty when merged), device
    template: str
    cfg: Optional[RunConfig] = None  # a run's config

    @property
    def model(self):
        return self.bundle.model

    @property
    def tokenizer(self):
        return self.bundle.tokenizer

    def check_base(self) -> None:
        if self.kind == MERGED:
            raise ConfigError(f"--base: {self.folder} is a merged model (the adapter is in its weights); pass the run or adapter folder")

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """Within: the base model alone (the adapter disabled)."""
        self.check_base()
        with self.model.disable_adapter():
            yield

    def drop_adapter(self) -> None:
        """From now on, the base model alone: a zero adapter (LoRA adds exactly 0)."""
        self.check_base()
        set_adapter(self.bundle.params, zeros_like(get_adapter(self.bundle.params)))


def folder_kind(path: Path) -> str:
    """RUN, ADAPTER or MERGED; CheckpointError for anything else."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return RUN
    if (path / ADAPTER_CONFIG).is_file():
        return ADAPTER
    if (path / MODEL_CONFIG).is_file() and any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        return MERGED
    if not path.exists():
        raise CheckpointError(f"{path} does not exist, so it is not a fedtune run directory, a PEFT adapter folder or a model folder; check the path")
    raise CheckpointError(
        f"{path} is not a fedtune run directory ({CONFIG_FILE}), a PEFT adapter folder ({ADAPTER_CONFIG}) or a model folder "
        f"({MODEL_CONFIG} and weights); check the path"
    )


def load_any_model(path: Path, *, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The model of a run directory, a PEFT adapter folder or a merged model folder (see the
    module docstring). ``device``/``dtype`` other than auto override the run's ``model.*``
    (and load without quantisation): export merges on the CPU in float32."""
    path = Path(path)
    kind = folder_kind(path)
    if kind == RUN:
        fixed = [] if device == dtype == "auto" else [f"model.device={device}", f"model.dtype={dtype}", "model.quantize=none"]
        cfg, bundle, folder = load_run_model(path, fixed)
        bundle.model.eval()  # as served: LoRA dropout off
        return LoadedModel(RUN, folder, bundle, cfg.data.template, cfg)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device, resolve_precision("auto", torch_device))
    record = read_share_record(path)
    if kind == ADAPTER:
        bundle = _adapter_bundle(path, record, torch_device, torch_dtype)
    else:
        tokenizer = load_tokenizer(str(path))
        model = load_model(str(path), dtype=torch_dtype, device=torch_device)
        bundle = ModelBundle(model, tokenizer, {}, None, str(path), torch_device, resolve_precision("auto", torch_device))
    bundle.model.eval()
    template = record.get("template") or ("chat" if getattr(bundle.tokenizer, "chat_template", None) else "alpaca")
    return LoadedModel(kind, path, bundle, template)


def _adapter_bundle(folder: Path, record: dict, device, dtype) -> ModelBundle:
    from peft import PeftModel

    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; copy the whole adapter folder")
    base = adapter_base(folder, record)
    has_tokenizer = any((folder / f).is_file() for f in TOKENIZER_FILES)
    try:
        tokenizer = load_tokenizer(str(folder) if has_tokenizer else base)
        model = load_model(base, dtype=dtype, device=device)
    except ModelError as err:
        if Path(base).exists():
            raise
        raise ModelError(_hub_base_missing(base, folder, err)) from None
    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except (ValueError, RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"adapter {folder} does not fit its base model {base} ({first}); check base_model_name_or_path") from None
    return ModelBundle(model, tokenizer, adapter_parameters(model), model.peft_config["default"], base, device,
                       resolve_precision("auto", device))


def adapter_base(folder: Path, record: dict) -> str:
    """The folder or hub id to load an adapter's base model from (see the module docstring)."""
    base = record.get("base_model") or {}
    local = base.get("local_path")
    if local and Path(local).is_dir():
        return local
    if base.get("model_name") == BUNDLED_MODEL:
        with contextlib.suppress(ModelError):  # the bundled package is not installed here: use the hub id
            return resolve_model_path(BUNDLED_MODEL)
    try:
        name = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is unreadable ({err}); copy the adapter folder again") from None
    if not name:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path; set it to the base model's hub id or folder")
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.startswith(("/", ".", "~")):
        raise ModelError(
            f"the base model folder {name} of adapter {folder} is not on this machine; copy it here, or set "
            f"base_model_name_or_path in {folder / ADAPTER_CONFIG} to the base's hub id"
        )
    return name


def _hub_base_missing(name: str, folder: Path, err: ModelError) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "not in the Hugging Face cache, and HF_HUB_OFFLINE is set" if offline else "not in the cache nor downloadable"
    return (f"cannot load the base model '{name}' of adapter {folder} ({why}); download it once with `hf download {name}`, "
            f"or set base_model_name_or_path in {folder / ADAPTER_CONFIG} to a local copy")
