"""LoRA on the shared base model: attach once, then swap adapter tensors in and out.

Adapters travel as ``dict[str, Tensor]`` with PEFT's canonical key names (the runtime adapter
name removed, as ``peft.get_peft_model_state_dict`` does), on CPU, float32 and contiguous.
Saved adapters are PEFT folders (``adapter_model.safetensors`` + ``adapter_config.json``)
that ``peft.PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedtune.errors import CheckpointError
from fedtune.types import Adapter

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def attach_lora(
    model,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Union[str, list[str]],
    seed: int,
    base_name: str,
):
    """Wrap ``model`` in a PEFT LoRA model (LoRA A random, B zero: starts equal to the base).

    The initialisation draws from a torch generator seeded by ``seed`` without touching the
    global RNG of the caller. Layers with dropout run fedtune's lean LoRA dropout
    (model/lora_dropout.py: same function, a quarter of the time and memory on CPU), and
    Llama-form layers keep less for backward (model/activations.py: same math).
    """
    from peft import LoraConfig, get_peft_model

    from fedtune.model.activations import use_lean_activations
    from fedtune.model.lora_dropout import use_lean_dropout

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    for p in adapter_parameters(peft_model).values():
        p.data = p.data.float()  # adapters train in float32 even over a bf16 base
    use_lean_dropout(peft_model)
    use_lean_activations(peft_model)
    return peft_model


def adapter_parameters(peft_model, adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """Canonical key -> live LoRA parameter of the model (built once, reused every round)."""
    marker = f".{adapter_name}"
    return {
        name.replace(marker, ""): p
        for name, p in peft_model.named_parameters()
        if "lora_" in name and marker in name
    }


def get_adapter(params: dict[str, torch.nn.Parameter]) -> Adapter:
    """A CPU float32 copy of the live adapter."""
    return {k: p.detach().to("cpu", torch.float32, copy=True).contiguous() for k, p in params.items()}


def set_adapter(params: dict[str, torch.nn.Parameter], adapter: Adapter) -> None:
    """Copy ``adapter`` into the live parameters; keys and shapes must match exactly."""
    check_fits(params, adapter)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(adapter[k])


def check_fits(params: dict[str, torch.nn.Parameter], adapter: Adapter) -> None:
    """Raise :class:`CheckpointError` unless ``adapter`` has exactly the keys and shapes of ``params``."""
    if adapter.keys() != params.keys():
        missing = sorted(params.keys() - adapter.keys())
        extra = sorted(adapter.keys() - params.keys())
        raise CheckpointError(
            f"adapter does not fit this model (missing {missing[:2]}, unexpected {extra[:2]}); "
            "check model.name and lora.* against the adapter's run"
        )
    for k, p in params.items():
        if p.shape != adapter[k].shape:
            raise CheckpointError(
                f"adapter tensor {k} has shape {tuple(adapter[k].shape)}, the model expects {tuple(p.shape)}; "
                "check lora.r and model.name"
            )


def zeros_like(adapter: Adapter) -> Adapter:
    return {k: torch.zeros_like(v) for k, v in adapter.items()}


def save_adapter(directory: Path, adapter: Adapter, peft_config) -> None:
    """Write a PEFT adapter folder (adapter tensors only)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config.save_pretrained(str(directory))


def load_adapter(directory: Path) -> tuple[Adapter, dict]:
    """Read a PEFT adapter folder: (tensors as float32, adapter_config as a dict)."""
    weights, config = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    if not weights.is_file() or not config.is_file():
        raise CheckpointError(f"{directory} is not a PEFT adapter folder (needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
    try:
        tensors = load_file(str(weights))
        meta = json.loads(config.read_text())
    except (SafetensorError, json.JSONDecodeError, OSError) as err:
        raise CheckpointError(f"{directory}: adapter files are unreadable ({err}); use another checkpoint") from None
    return {k: v.float().contiguous() for k, v in tensors.items()}, meta
