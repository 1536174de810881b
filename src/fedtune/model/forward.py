"""Per-sequence negative log-likelihood of the labelled (response) tokens.

One function serves training (sum over rows / tokens), held-out evaluation (per row, grouped
by category) and preference optimisation (log-probabilities of chosen/rejected answers).

Speed: a causal LM's forward computes vocabulary logits at every position, but the loss only
needs them where a label is set. For model families whose head is a plain linear layer over
the final hidden state, we run the decoder body, pick the labelled positions and apply the
head to those alone. On SmolLM2 (49k vocabulary) with instruction data this skips the
prompt and padding positions of the largest matmul and its softmax. Other families use the
model's own forward.

Memory: the head and the softmax run over at most ``CHUNK`` labelled positions at a time.
Without gradients (evaluation, DPO reference log-probs) that is a loop; with them,
:class:`HeadNLL` computes each chunk's loss and its gradient with respect to the hidden
states in the forward pass (as Liger-Kernel's fused linear cross-entropy does on GPU), so
training keeps an (n, d) gradient instead of (n, V) logits, their log-softmax and its
gradient: for 500 labelled positions and SmolLM2's 49k vocabulary, 2.4 MB instead of ~300 MB.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fedtune.model.attention import PREFIX, SEGMENTS, kv_cache
from fedtune.model.frozen import head_weight, plain_frozen_head

# Families whose CausalLM forward is exactly lm_head(decoder(x).last_hidden_state):
# no logit soft-capping or scaling between the two.
PLAIN_HEAD_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "phi3", "gpt_neox"})
CHUNK = 128  # labelled positions per head + softmax call (128: the step's peak 46 MB lower than at 256, and no slower)


def _body_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in PLAIN_HEAD_FAMILIES:
        return None
    body = getattr(base, base.base_model_prefix, None)
    head = base.get_output_embeddings()
    if body is None or head is None:
        return None
    return body, head


def sequence_nll(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    segments: Optional[torch.Tensor] = None,
    prefix: Optional[list] = None,
):
    """Return (nll per row (b,), labelled tokens per row (b,)), summed over each row's
    labelled positions. Positions with label -100 do not count.

    A packed batch (``data.prompts.pack``: one row, ``position_ids`` and the example lengths
    in ``segments`` (k,)) gives one entry per example (k,) instead, with exact per-example
    attention (model/attention.py); ``prefix`` (:func:`prefix_states`) puts the same leading
    tokens, cut off before packing, back in front of every example."""
    targets = labels[:, 1:]  # (b, t-1): token t+1 is predicted at position t
    mask = targets != -100  # (b, t-1)
    if segments is None:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        rows, count = mask.nonzero(as_tuple=True)[0], input_ids.shape[0]  # (n,) row of each labelled position
    else:
        inputs = {"input_ids": input_ids, "position_ids": position_ids, SEGMENTS: segments}
        if prefix is not None:
            inputs[PREFIX] = prefix
        example = torch.repeat_interleave(torch.arange(len(segments), device=segments.device), segments)  # (t,)
        rows, count = example[:-1].to(input_ids.device)[mask[0]], len(segments)  # (n,) example of each labelled position
    parts = _body_and_head(model)
    if parts is not None:
        body, head = parts
        hidden = body(**inputs).last_hidden_state[:, :-1][mask]  # (n, d): the head runs on labelled positions only
        if not plain_frozen_head(head):
            token_nll = _token_nll(lambda s: head(hidden[s]), targets[mask])
        elif torch.is_grad_enabled() and hidden.requires_grad:
            token_nll = HeadNLL.apply(hidden, _weight_as_read(head), targets[mask])
        else:  # the weight as autocast reads it, cast once and not for every chunk (as long as the chunk's matmul)
            weight = _weight_as_read(head)
            token_nll = _token_nll(lambda s: F.linear(hidden[s], weight), targets[mask])
    else:
        logits = model(**inputs).logits[:, :-1][mask]  # (n, V)
        token_nll = _token_nll(lambda s: logits[s], targets[mask])
    nll = torch.zeros(count, dtype=token_nll.dtype, device=token_nll.device).index_add(0, rows, token_nll)  # (b,) or (k,)
    return nll, torch.bincount(rows, minlength=count)


def prefix_states(model, prefix_ids: torch.Tensor) -> Optional[list]:
    """Each layer's (keys, values), (1, kv heads, p, head dim), of the tokens ``prefix_ids`` (p,)
    at positions 0..p-1, for :func:`sequence_nll`'s ``prefix``; None where the model's KV cache
    is not a plain one (model/attention.py ``kv_cache``)."""
    _, cache = kv_cache(model(input_ids=prefix_ids[None], use_cache=True, logits_to_keep=1))
    return None if cache is None else [(layer.keys, layer.values) for layer in cache.layers]


@torch.inference_mode()
def caches_every_position(model) -> bool:
    """True when ``model``'s KV cache is a plain one (:func:`prefix_states` works): one token
    run in eval mode, so no dropout draws from the caller's random generator."""
    was_training = model.training
    model.eval()
    try:
        return prefix_states(model, torch.zeros(1, dtype=torch.long, device=next(model.parameters()).device)) is not None
    finally:
        model.train(was_training)


def _token_nll(logits_of, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each of the n ``targets`` (n,); ``logits_of(slice)`` gives those
    positions' logits. One call with gradients, ``CHUNK`` positions at a time without."""
    n = targets.shape[0]
    if torch.is_grad_enabled() or n <= CHUNK:
        return F.cross_entropy(logits_of(slice(0, n)).float(), targets, reduction="none")
    return torch.cat([
        F.cross_entropy(logits_of(slice(s, s + CHUNK)).float(), targets[s : s + CHUNK], reduction="none")
        for s in range(0, n, CHUNK)
    ])


def _weight_as_read(head) -> torch.Tensor:
    """A frozen plain head's weight as its matmuls read it: under autocast in autocast's dtype
    (the copy a training process keeps, model/frozen.py, or a cast made now), else as it is."""
    device = head.weight.device.type
    return head_weight(head, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else head.weight


class HeadNLL(torch.autograd.Function):
    """Per-position cross-entropy of ``hidden @ weight^T`` (n,), computed ``CHUNK`` rows at a
    time; the gradient with respect to ``hidden`` is formed in the forward pass, chunk by chunk
    (softmax - one-hot) @ weight, and scaled by the incoming gradient in backward.

    Each chunk's softmax is made in place in one float32 buffer: the logits shifted by the row's
    largest, exponentiated, summed and divided (the log of the sum, less the shifted target
    logit, is the loss), a pass fewer than ``logsumexp`` and then ``exp(logits - lse)``. The
    chunks reuse that buffer and, under autocast, one of the head's dtype for the logits and the
    probabilities: a fresh (128, 49k) tensor per use was a fresh memory map of up to 25 MB whose
    pages were faulted in every time (13-30 ms of SmolLM2's head per micro-batch)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # the cast autocast would make for every chunk's two matmuls, made once
            weight = weight.to(torch.get_autocast_dtype(device))  # (none where the caller passes the head's stored copy)
        ctx.hidden_dtype = hidden.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad = torch.empty(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        logits = torch.empty(min(n, CHUNK), vocab, dtype=torch.float32, device=hidden.device)
        own = None if weight.dtype == torch.float32 else torch.empty_like(logits, dtype=weight.dtype)  # the head's own dtype
        with torch.autocast(device, enabled=False):  # the matmuls in the head's dtype, as autocast computes them
            hidden = hidden.to(weight.dtype)
            for s in range(0, n, CHUNK):
                target = targets[s : s + CHUNK]
                c, rows = len(target), torch.arange(len(target), device=hidden.device)
                chunk = logits[:c]  # (c, V)
                if own is None:
                    torch.mm(hidden[s : s + c], weight.t(), out=chunk)
                else:
                    chunk.copy_(torch.mm(hidden[s : s + c], weight.t(), out=own[:c]))
                shifted = chunk.sub_(chunk.amax(dim=-1, keepdim=True))  # each row's largest at 0
                picked = shifted[rows, target]  # (c,)
                probs = shifted.exp_()
                total = probs.sum(dim=-1)  # (c,)
                nll[s : s + c] = total.log() - picked
                probs.div_(total[:, None])  # softmax
                probs[rows, target] -= 1.0
                if own is None:
                    torch.mm(probs, weight, out=grad[s : s + c])
                else:
                    grad[s : s + c] = own[:c].copy_(probs) @ weight
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (grad,) = ctx.saved_tensors
        return (grad * grad_nll[:, None]).to(ctx.hidden_dtype), None, None
