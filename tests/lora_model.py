"""A tiny LoRA model with its adapter switched on, as a run leaves it (for evaluation and generation tests)."""

import torch

from fedtune.model.attention import use_packed_attention
from fedtune.model.base import load_model
from fedtune.model.lora import adapter_parameters, attach_lora, get_adapter, set_adapter


def active_lora_model(model_dir, seed: int):
    """The tiny model in fp32 with LoRA on all linear layers, B != 0 (seeded), and packed attention switched on."""
    base = load_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=0.1, target_modules="all-linear", seed=0, base_name=str(model_dir))
    params = adapter_parameters(model)
    g = torch.Generator().manual_seed(seed)
    set_adapter(params, {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in get_adapter(params).items()})  # LoRA active
    assert use_packed_attention(model)
    return model
