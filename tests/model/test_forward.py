import pytest
import torch
import torch.nn.functional as F

from fedtune.data.prompts import collate, encode_pairs, render_example
from fedtune.model import forward
from fedtune.model.base import load_model
from fedtune.model.lora import adapter_parameters, attach_lora, get_adapter, set_adapter
from tests.tolerance import FORWARD, GRAD, close


def lora_model(path):
    base = load_model(str(path), dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear", seed=0, base_name=str(path))
    params = adapter_parameters(model)
    set_adapter(params, {k: torch.randn_like(v) * 0.2 for k, v in get_adapter(params).items()})
    return model, params


def batch_of(tokenizer, rows):
    pairs = [render_example(tokenizer, "chat", q, "", a) for q, a in rows]
    return encode_pairs(tokenizer, pairs, 64, "chat")


ROWS = [("What is 2 plus 2?", "4"), ("Name a long river in Africa please.", "The Nile."), ("Hi", "Hello there, friend.")]


def reference_nll(model, batch):
    """What the model's own forward gives: full logits, then CE on the labelled positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")  # (b, t-1)
    return nll.sum(1), (targets != -100).sum(1)


def test_fast_path_equals_full_forward(tiny_model_dir, tokenizer):
    model, _ = lora_model(tiny_model_dir)
    model.eval()
    batch = collate(batch_of(tokenizer, ROWS), tokenizer.pad_token_id)
    assert forward._body_and_head(model) is not None  # llama takes the fast path
    with torch.no_grad():
        nll, tokens = forward.sequence_nll(model, **batch)
        ref_nll, ref_tokens = reference_nll(model, batch)
    assert torch.equal(tokens, ref_tokens)
    assert close(nll, ref_nll, FORWARD)


def test_fast_path_gradients_equal_full_forward(tiny_model_dir, tokenizer):
    model, params = lora_model(tiny_model_dir)
    batch = collate(batch_of(tokenizer, ROWS), tokenizer.pad_token_id)
    forward.sequence_nll(model, **batch)[0].sum().backward()
    fast = {k: p.grad.clone() for k, p in params.items()}
    model.zero_grad()
    reference_nll(model, batch)[0].sum().backward()
    assert all(close(fast[k], p.grad, GRAD) for k, p in params.items())


def test_padded_batch_equals_one_by_one(tiny_model_dir, tokenizer):
    """Right padding with an attention mask: padding changes nothing (DESIGN.md)."""
    model, params = lora_model(tiny_model_dir)
    encs = batch_of(tokenizer, ROWS)
    batched, _ = forward.sequence_nll(model, **collate(encs, tokenizer.pad_token_id))
    batched.sum().backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    model.zero_grad()
    singles = []
    for e in encs:
        nll, _ = forward.sequence_nll(model, **collate([e], tokenizer.pad_token_id))
        nll.sum().backward()
        singles.append(nll.detach())
    assert close(batched.detach(), torch.cat(singles), FORWARD)
    assert all(close(grads[k], p.grad, GRAD) for k, p in params.items())
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_packed_row_equals_padded_batch(tiny_model_dir, tokenizer):
    """One packed row with per-example attention gives each example's own loss and gradient."""
    from fedtune.data.prompts import pack
    from fedtune.model.attention import use_packed_attention

    model, params = lora_model(tiny_model_dir)
    assert use_packed_attention(model)
    encs = batch_of(tokenizer, ROWS)
    padded, padded_tokens = forward.sequence_nll(model, **collate(encs, tokenizer.pad_token_id))
    padded.sum().backward()
    padded_grads = {k: p.grad.clone() for k, p in params.items()}
    model.zero_grad()
    packed_batch = pack(encs)
    assert packed_batch["input_ids"].shape == (1, sum(int(e.input_ids.numel()) for e in encs))
    packed, packed_tokens = forward.sequence_nll(model, **packed_batch)
    packed.sum().backward()
    assert torch.equal(packed_tokens, padded_tokens)
    assert close(packed, padded, FORWARD)
    assert all(close(p.grad, padded_grads[k], GRAD) for k, p in params.items())
    with torch.no_grad():  # without segments the packed row would mix the examples
        mixed, _ = forward.sequence_nll(model, packed_batch["input_ids"], packed_batch["labels"])
    # a random tiny model attends weakly: mixing moves the sum ~8e-4 relative (measured), 80x FORWARD noise
    assert not close(mixed.sum(), packed.sum().detach(), 10 * FORWARD)


def test_chunked_inference_loss_equals_one_call(tiny_model_dir, tokenizer, monkeypatch):
    model, _ = lora_model(tiny_model_dir)
    batch = collate(batch_of(tokenizer, ROWS), tokenizer.pad_token_id)
    with torch.no_grad():
        whole, _ = forward.sequence_nll(model.eval(), **batch)
        monkeypatch.setattr(forward, "CHUNK", 3)
        chunked, _ = forward.sequence_nll(model, **batch)
    assert close(whole, chunked, FORWARD)


class HeadCasts:
    """Counts casts of a (V, d) head weight to bf16 while active."""

    def __init__(self, shape):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func is torch.ops.aten._to_copy.default and tuple(out.shape) == tuple(shape) and out.dtype == torch.bfloat16:
                    counter.count += 1
                return out

        self.count, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_inference_loss_under_bf16_autocast_casts_the_head_once_with_autocasts_values(tiny_model_dir, tokenizer, monkeypatch):
    """Evaluation (no gradients) applies the head chunk by chunk; autocast cast the (V, d) weight
    again for every chunk, which took as long as the chunk's matmul. Now once, same values."""
    model, _ = lora_model(tiny_model_dir)
    head = model.get_base_model().get_output_embeddings()
    batch = collate(batch_of(tokenizer, ROWS), tokenizer.pad_token_id)
    monkeypatch.setattr(forward, "CHUNK", 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with HeadCasts(head.weight.shape) as once:
            ours, _ = forward.sequence_nll(model.eval(), **batch)
        monkeypatch.setattr(forward, "plain_frozen_head", lambda head: False)  # the head module itself: autocast casts per chunk
        with HeadCasts(head.weight.shape) as per_chunk:
            theirs, _ = forward.sequence_nll(model, **batch)
    assert once.count == 1 and per_chunk.count > 2
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.double, torch.float32])
@pytest.mark.parametrize("chunk", [2, 256])
def test_fused_head_loss_and_gradient_equal_plain_cross_entropy(chunk, dtype, monkeypatch):
    monkeypatch.setattr(forward, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=g, dtype=torch.double).to(dtype).requires_grad_()
    weight = torch.randn(11, 5, generator=g, dtype=torch.double).to(dtype)
    targets = torch.randint(0, 11, (7,), generator=g)
    upstream = torch.rand(7, generator=g, dtype=torch.double)
    ours = forward.HeadNLL.apply(hidden, weight, targets)
    plain = F.cross_entropy(hidden.double() @ weight.double().T, targets, reduction="none")
    assert ours.dtype == torch.float32 and close(ours.double(), plain, 1e-6)  # float32 nll against float64: a few float32 roundings
    (grad,) = torch.autograd.grad((ours.double() * upstream).sum(), hidden)
    (plain_grad,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    assert grad.dtype == dtype and close(grad.double(), plain_grad, 1e-6)


def test_fused_head_under_bf16_autocast_casts_the_head_once_and_computes_as_autocast(monkeypatch):
    """Before: autocast cast the (V, d) head weight to bf16 for both matmuls of every chunk (six
    casts of SmolLM2's 49k x 576 head per step, 3% of it); now once per call (none where a training
    process keeps a bf16 copy, model/frozen.py), with autocast's logits and gradient."""
    monkeypatch.setattr(forward, "CHUNK", 2)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=g, requires_grad=True)
    weight, targets = torch.randn(11, 5, generator=g), torch.randint(0, 11, (7,), generator=g)
    upstream = torch.rand(7, generator=g)
    with HeadCasts(weight.shape) as casts, torch.autocast("cpu", dtype=torch.bfloat16):
        ours = forward.HeadNLL.apply(hidden, weight, targets)
    assert casts.count == 1
    (grad,) = torch.autograd.grad((ours * upstream).sum(), hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast computes chunk by chunk, cast by cast
        logits = torch.cat([F.linear(hidden[s : s + 2], weight).float() for s in range(0, 7, 2)])
    plain = F.cross_entropy(logits, targets, reduction="none")
    (plain_grad,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    assert close(ours, plain, 1e-6)
    assert close(grad, plain_grad, 2e-2)  # the probabilities go into the input gradient's matmul in bf16, as under autocast


def test_fused_head_loss_where_the_target_is_far_below_the_largest_logit():
    """The loss is log(sum(exp(logit - max))) - (target - max): no softmax probability is logged,
    so a target 200 below the largest logit (probability 0 in float32) still gives its loss and
    its gradient."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[100.0, 0.0], [-100.0, 0.0], [0.0, 3.0]])
    targets = torch.tensor([1, 2])
    ours = forward.HeadNLL.apply(hidden, weight, targets)
    plain = F.cross_entropy(hidden.double() @ weight.double().T, targets, reduction="none")
    assert close(ours, plain.float(), 1e-6)
    assert close(ours, torch.tensor([200.0, 0.0949]), 1e-3)
    (grad,) = torch.autograd.grad(ours.sum(), hidden)
    (plain_grad,) = torch.autograd.grad(plain.sum(), hidden)
    assert close(grad.double(), plain_grad, 1e-6)  # row 0: softmax (1, 0, 0) less one-hot at 1: (100, 0) - (-100, 0) = (200, 0)
