"""Per-sequence negative log-likelihood of the labelled (response) tokens.

One function serves training (sum over rows / tokens), held-out evaluation (per row, grouped
by category) and preference optimisation (log-probabilities of chosen/rejected answers).

Speed: a causal LM's forward computes vocabulary logits at every position, but the loss only
needs them where a label is set. For model families whose head is a plain linear layer over
the final hidden state, we run the decoder body, pick the labelled positions and apply the
head to those alone. On SmolLM2 (49k vocabulary) with instruction data this skips the
prompt and padding positions of the largest matmul and its softmax. Other families use the
model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Families whose CausalLM forward is exactly lm_head(decoder(x).last_hidden_state):
# no logit soft-capping or scaling between the two.
PLAIN_HEAD_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "phi3", "gpt_neox"})


def _body_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in PLAIN_HEAD_FAMILIES:
        return None
    body = getattr(base, base.base_model_prefix, None)
    head = base.get_output_embeddings()
    if body is None or head is None:
        return None
    return body, head


def sequence_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Return (nll per row (b,), labelled tokens per row (b,)), summed over each row's
    labelled positions. Positions with label -100 do not count."""
    targets = labels[:, 1:]  # (b, t-1): token t+1 is predicted at position t
    mask = targets != -100  # (b, t-1)
    parts = _body_and_head(model)
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, t, d)
        logits = head(hidden[:, :-1][mask]).float()  # (n, V) for the n labelled positions only
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask].float()  # (n, V)
    token_nll = F.cross_entropy(logits, targets[mask], reduction="none")  # (n,)
    rows = mask.nonzero(as_tuple=True)[0]  # (n,) row of each labelled position
    nll = torch.zeros(input_ids.shape[0], dtype=token_nll.dtype, device=token_nll.device)
    nll = nll.index_add(0, rows, token_nll)  # (b,)
    return nll, mask.sum(dim=1)
