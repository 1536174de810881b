"""model/frozen.py: the frozen base projections stored in bf16 change nothing under autocast."""

import torch

from fedtune.config import load_config
from fedtune.data.prompts import pack
from fedtune.federation import setup
from fedtune.model import forward, frozen
from fedtune.model.attention import use_packed_attention
from fedtune.model.base import load_model
from fedtune.model.lora import adapter_parameters, attach_lora, get_adapter, set_adapter
from tests.model.test_forward import HeadCasts, batch_of, ROWS
from tests.tolerance import close


def lora_model(path):
    base = load_model(str(path), dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=0.1, target_modules="all-linear", seed=0, base_name=str(path))
    params = adapter_parameters(model)
    set_adapter(params, {k: torch.randn_like(v, generator=torch.Generator().manual_seed(1)) * 0.2 for k, v in get_adapter(params).items()})
    use_packed_attention(model)
    return model, params


def bf16_step(model, params, batch):
    """One training forward and backward under bf16 autocast, with seeded LoRA dropout."""
    torch.manual_seed(0)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, _ = forward.sequence_nll(model, **batch)
    nll.sum().backward()
    return nll.detach(), {k: p.grad.clone() for k, p in params.items()}


def test_bf16_storage_gives_the_autocast_step_bit_for_bit(tiny_model_dir, tokenizer):
    """Before: the frozen float32 weights were kept next to the bf16 copies autocast made for backward."""
    batch = pack(batch_of(tokenizer, ROWS))
    model, params = lora_model(tiny_model_dir)
    before_nll, before_grads = bf16_step(model, params, batch)
    changed = frozen.store_in(model, torch.bfloat16)
    assert changed == 2 * 7  # q k v o gate up down in each of the 2 layers
    converted = [m for m in model.modules() if isinstance(m, frozen.LowPrecisionLinear)]
    assert len(converted) == changed and all(m.weight.dtype == torch.bfloat16 for m in converted)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # embeddings (and the tied head) stay
    assert all(p.dtype == torch.float32 for p in params.values())  # the adapter trains in float32
    head = model.get_output_embeddings()
    assert getattr(head, frozen.HEAD_COPY).dtype == torch.bfloat16 and not any(k.endswith(frozen.HEAD_COPY) for k in model.state_dict())
    with HeadCasts(head.weight.shape) as casts:  # the loss reads the head's bf16 copy: no cast per micro-batch
        after_nll, after_grads = bf16_step(model, params, batch)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            forward.sequence_nll(model, **batch)
    assert casts.count == 0
    assert torch.equal(before_nll, after_nll)
    assert all(torch.equal(before_grads[k], after_grads[k]) for k in params)
    assert frozen.store_in(model, torch.bfloat16) == 0  # once


def test_outside_autocast_a_converted_model_takes_and_returns_float32(tiny_model_dir, tokenizer):
    """Generation and serving call the model without autocast: float32 in, float32 out."""
    model, _ = lora_model(tiny_model_dir)
    model.eval()
    ids = batch_of(tokenizer, ROWS[:1])[0].input_ids[None]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        frozen.store_in(model, torch.bfloat16)
        low = model(input_ids=ids).logits
    assert low.dtype == torch.float32
    assert close(low, full, 2e-2)  # the projections' bf16 rounding, nothing more


def test_build_model_stores_bf16_only_where_a_process_trains_under_bf16_autocast(tiny_overrides):
    def converted(*overrides, training=True):
        bundle = setup.build_model(load_config(None, [*tiny_overrides, *overrides]), training=training)
        assert (frozen.stored_dtype(bundle.model) is not None) == any(isinstance(m, frozen.LowPrecisionLinear) for m in bundle.model.modules())
        return sum(isinstance(m, frozen.LowPrecisionLinear) for m in bundle.model.modules())

    assert converted("train.precision=bf16") == 14
    assert converted("train.precision=fp32") == 0
    assert converted("train.precision=bf16", "model.dtype=float32") == 0
    assert converted("train.precision=bf16", training=False) == 0  # eval, chat, serve, export: the float32 model's answers


def test_the_base_cache_keys_answers_apart_and_shares_losses(tiny_overrides, tmp_path):
    """A run's bf16-projection answers are not served to `fedtune eval --base` (float32 model); its
    held-out losses, computed under autocast where both are bit-for-bit equal, are shared."""
    from fedtune.evaluation.base_cache import BaseEvalCache

    cfg = load_config(None, [*tiny_overrides, "train.precision=bf16"])
    cache = BaseEvalCache(tmp_path / "cache")
    trained, plain = setup.build_model(cfg, training=True), setup.build_model(cfg)
    assert cache.model_key(trained) == cache.model_key(plain)  # losses: one entry
    calls = []

    def answers(bundle, answer):
        return cache.answers(bundle, ["Q: hi"], add_special_tokens=False, max_new_tokens=4, batch_size=8,
                             compute=lambda: calls.append(answer) or [answer])

    assert answers(trained, "bf16") == ["bf16"]
    assert answers(plain, "fp32") == ["fp32"]
    assert answers(trained, "again") == ["bf16"]
    assert calls == ["bf16", "fp32"]


def test_a_tied_lm_head_among_the_targets_stays_float32(tiny_model_dir):
    """The head shares its weight with the embeddings: converting it would make the residual stream bf16."""
    base = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"], seed=0, base_name=str(tiny_model_dir))
    assert base.get_output_embeddings().get_base_layer().weight is base.get_input_embeddings().weight  # tied
    assert frozen.store_in(model, torch.bfloat16) == 2  # the two q_proj, not the head
    assert model.get_input_embeddings().weight.dtype == torch.float32
