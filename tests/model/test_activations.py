import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.model.activations import Recompute, SiluMul, silu_mul, use_lean_activations
from fedtune.model.base import load_model
from fedtune.model.lora import adapter_parameters, attach_lora


@given(rows=st.integers(1, 9), cols=st.integers(1, 40), bf16=st.booleans(), seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_silu_mul_is_eager_silu_times_up_bit_for_bit(rows, cols, bf16, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    gate, up, grad = (4 * torch.randn(rows, cols, generator=g) for _ in range(3))
    gate, up, grad = gate.to(dtype), up.to(dtype), grad.to(dtype)

    def run(fused: bool):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = SiluMul.apply(a, b) if fused else torch.nn.functional.silu(a) * b
        return (out, *torch.autograd.grad(out, (a, b), grad))

    assert all(torch.equal(x, y) for x, y in zip(run(True), run(False)))


def _lora(path):
    base = load_model(str(path), dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=0.1, target_modules="all-linear", seed=0, base_name=str(path))
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def _step(model, autocast: bool):
    """Logits and adapter gradients of one seeded training forward; the dtype and shape of every
    tensor kept for backward (each once, however many operations keep it)."""
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 11, 3]])
    saved = []
    model.train()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape), t.data_ptr())) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits.float()
    saved = [(dtype, shape) for dtype, shape, _ in set(saved)]
    if not logits.requires_grad:  # adapters disabled: the frozen base alone
        return logits, (), saved
    grads = torch.autograd.grad(logits.square().mean(), list(adapter_parameters(model).values()))
    return logits, grads, saved


@pytest.fixture
def eager(monkeypatch):
    """attach_lora as it was without lean activations, until ``eager.undo()``."""
    monkeypatch.setattr("fedtune.model.activations.use_lean_activations", lambda model: {"mlp": 0, "norms": 0})
    return monkeypatch


def test_installed_on_every_llama_layer_once(tiny_model_dir):
    model = _lora(tiny_model_dir)
    assert use_lean_activations(model) == {"mlp": 0, "norms": 0}  # attach_lora installed them: none twice
    fresh = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    assert use_lean_activations(fresh) == {"mlp": 2, "norms": 4}  # the tiny Llama's two layers


def test_fp32_training_is_bit_for_bit_eager_and_keeps_three_tensors_less_per_layer(tiny_model_dir, eager):
    plain_logits, plain_grads, plain_saved = _step(_lora(tiny_model_dir), autocast=False)  # eager (patched)
    eager.undo()
    logits, grads, saved = _step(_lora(tiny_model_dir), autocast=False)
    assert torch.equal(logits, plain_logits) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    wide, hidden = (torch.float32, (1, 8, 128)), (torch.float32, (1, 8, 64))  # (batch, tokens, intermediate / hidden size)
    # silu(gate) and down_proj's input silu(gate) * up, of each of the two layers, computed again in backward
    assert plain_saved.count(wide) - saved.count(wide) == 4
    # the two norms' outputs (the LoRA inputs of q/k/v and gate/up), computed again from the norms' inputs,
    # which the norms keep anyway; not the first layer's input norm, whose input (the frozen embedding's
    # output) nothing keeps
    assert plain_saved.count(hidden) - saved.count(hidden) == 4 - 1


def test_under_bf16_autocast_the_lora_input_is_kept_in_bf16_and_the_base_computes_as_before(tiny_model_dir, eager):
    # Arrange: the eager model and the lean one, both under bf16 autocast
    plain = _lora(tiny_model_dir)
    plain_logits, plain_grads, plain_saved = _step(plain, autocast=True)
    with plain.disable_adapter():
        plain_base, _, _ = _step(plain, autocast=True)
    eager.undo()
    lean = _lora(tiny_model_dir)
    # Act
    logits, grads, saved = _step(lean, autocast=True)
    with lean.disable_adapter():
        base, _, _ = _step(lean, autocast=True)
    # Assert: the frozen base computes exactly what it did (autocast made the same casts)
    assert torch.equal(base, plain_base)
    # the norms' float32 outputs (2 norms x 2 layers) are not kept; their bf16 casts are computed again in
    # backward, but for the first layer's input norm (see the float32 test), whose bf16 output is kept;
    # nor are silu(gate) or down_proj's bf16 input
    hidden32, hidden16 = (torch.float32, (1, 8, 64)), (torch.bfloat16, (1, 8, 64))
    assert plain_saved.count(hidden32) - saved.count(hidden32) == 4 and saved.count(hidden16) == plain_saved.count(hidden16) + 1
    assert plain_saved.count((torch.bfloat16, (1, 8, 128))) - saved.count((torch.bfloat16, (1, 8, 128))) == 4
    # with the adapters on, the LoRA branch reads a bf16-rounded input: as close to float32 training as before
    ref_logits, ref_grads, _ = _step(lean, autocast=False)

    def error(a, b):  # relative L2 error against float32 training
        a, b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
        return float((a - b).norm() / b.norm())

    assert error([logits], [ref_logits]) <= 2 * error([plain_logits], [ref_logits])
    assert error(grads, ref_grads) <= 2 * error(plain_grads, ref_grads)


def test_other_forms_keep_their_own_forward(tokenizer, tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                                             num_experts_per_tok=2, **common))
    gemma2 = Gemma2ForCausalLM(Gemma2Config(head_dim=8, **common))
    # Qwen2-MoE: its shared expert is a Llama-form MLP, but the layer's norm feeds a router and expert sums
    assert use_lean_activations(moe) == {"mlp": 1, "norms": 0}
    # Gemma 2: sandwich norms and a GELU MLP
    assert use_lean_activations(gemma2) == {"mlp": 0, "norms": 0}


def test_norms_keep_float32_where_a_lora_layer_would_cast_back_to_it(tiny_model_dir):
    # without dropout the adapted layers run PEFT's own forward, which casts its input to the adapter's
    # float32: a bf16 norm output would cost a conversion more and save nothing
    base = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear", seed=0, base_name=str(tiny_model_dir))
    norms = [m for n, m in model.named_modules() if n.endswith(("input_layernorm", "post_attention_layernorm"))]
    assert len(norms) == 4 and not any(m._forward_hooks for m in norms)
    assert sum("forward" in m.__dict__ for m in model.modules()) == 2  # the MLPs still recompute silu(gate)


def test_computing_the_lora_inputs_again_gives_the_same_bits_with_and_without_checkpointing(tiny_model_dir, monkeypatch):
    # Arrange: the lean model, with (non-reentrant) gradient checkpointing switchable per layer
    model = _lora(tiny_model_dir)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    computed = []
    tensor = Recompute.tensor
    monkeypatch.setattr(Recompute, "tensor", lambda self, *a: (self.value is None and computed.append(self.fn)) or tensor(self, *a))

    def run(autocast: bool, checkpointed: bool):
        for m in layers:
            m.gradient_checkpointing = checkpointed
        computed.clear()
        logits, grads, saved = _step(model, autocast)
        return [logits, *grads], len(saved)

    for autocast in (False, True):
        with monkeypatch.context() as m:  # the LoRA layers keep their inputs, as before
            m.setattr("fedtune.model.lora_dropout.recipe_of", lambda t: (None, ()))
            kept, kept_count = run(autocast, checkpointed=False)
        assert computed == []
        for checkpointed in (False, True):
            # Act: the norm outputs and down_proj inputs computed again in backward
            again, count = run(autocast, checkpointed)
            # Assert: they were, once each (per layer: two norm outputs, as gradient checkpointing makes the
            # embedding's output need a gradient, and down_proj's input), and bit for bit the logits and
            # adapter gradients of keeping them
            assert sum(f is silu_mul for f in computed) == 2 and len(computed) == 2 * 3
            assert (count < kept_count / 4) == checkpointed  # checkpointing keeps the layers' inputs alone
            assert len(again) == len(kept) > 1 and all(torch.equal(a, b) for a, b in zip(again, kept))


def test_a_recipe_computes_once_for_all_its_users_under_the_autocast_state_it_was_made_in():
    from fedtune.model.activations import recipe_of, recompute_later

    # Arrange: a bf16 autocast matmul marked as computable again, read by two users
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 8, generator=g), torch.randn(8, 3, generator=g)
    calls = []

    def fn(a):
        calls.append(1)
        return a @ w

    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = recompute_later(fn(x), fn, x)
    recipe, args = recipe_of(t)
    recipe.keep(), recipe.keep()
    calls.clear()
    # Act: backward asks outside autocast, once per user
    first, second = recipe.tensor(*args), recipe.tensor(*args)
    # Assert: the forward's bits and dtype, computed once; nothing held after the last user
    assert first.dtype == torch.bfloat16 and torch.equal(first, t) and second is first
    assert len(calls) == 1 and recipe.value is None
    assert recipe_of(torch.zeros(1)) == (None, ())
