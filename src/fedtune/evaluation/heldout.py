"""Held-out loss and perplexity of the model as it stands, overall and per category.

Loss is the mean negative log-likelihood per response token (token-weighted, as in
training); perplexity is its exponential.

Batches are built once, as training builds its micro-batches: examples sorted by length, cut
into groups of ``batch_size``, each group cut at ``max_tokens`` (data/batching.py), then either
packed into one row with per-example attention (``packing``, model/attention.py: no padding)
or right-padded. Both give the same per-example NLL up to float summation order.

Packed, with ``shared_prefix``: the tokens every example starts with (a chat template's
system prompt, Alpaca's preamble; before any response token) are cut off every example and
run once per evaluation; each example attends to their keys and values as if they were still
in front of it (model/attention.py), at the positions it would have. On the demo data that
is ~25 of ~60 tokens per example not run again.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

import torch

from fedtune.client.optim import AUTOCAST
from fedtune.data.batching import split_by_tokens
from fedtune.data.prompts import Encoded, collate, pack, to_device
from fedtune.evaluation.base_cache import encoded_digest
from fedtune.model.forward import prefix_states, sequence_nll
from fedtune.model.generate import SHARED_PREFIX_MIN, shared_prefix
from fedtune.reporting.progress import HELDOUT, Progress


def eval_groups(sizes: Sequence[int], batch_size: int, max_tokens: Optional[int], packed: bool) -> list[list[int]]:
    """Positions into ``sizes`` grouped into evaluation batches: sorted by size (little
    padding), ``batch_size`` per group, each group cut at ``max_tokens`` (None: uncut) as
    training cuts its micro-batches. Packed rows under a token budget are cut at the budget
    alone (no padding to limit, so the fewest rows). Every position appears once. Pure."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    if packed and max_tokens is not None:
        return split_by_tokens(order, sizes, max_tokens, packed)
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if max_tokens is None:
        return groups
    return [piece for g in groups for piece in split_by_tokens(g, sizes, max_tokens, packed)]


def prompt_prefix(examples: Sequence[Encoded]) -> int:
    """How many leading tokens every example shares, within every prompt and leaving each
    example the last prompt token (which predicts its first response token); 0 below
    :data:`~fedtune.model.generate.SHARED_PREFIX_MIN`. Pure."""
    if not examples:
        return 0
    n = shared_prefix([e.input_ids[: e.prompt_len].tolist() for e in examples])  # generation's count, on the prompts
    return n if n >= SHARED_PREFIX_MIN else 0


class HeldoutEvaluator:
    """Evaluates on a fixed set; batches are built once (see the module docstring)."""

    def __init__(self, examples: Sequence[Encoded], categories: Sequence[str], *, batch_size: int, pad_id: int,
                 packing: bool = False, max_tokens: Optional[int] = None, precision: str = "fp32", shared_prefix: bool = False):
        shared = prompt_prefix(examples) if packing and shared_prefix else 0
        self.prefix = examples[0].input_ids[:shared] if shared else None
        rows = [Encoded(e.input_ids[shared:], e.prompt_len - shared) for e in examples] if shared else examples
        sizes = [int(e.input_ids.numel()) for e in rows]
        groups = eval_groups(sizes, batch_size, max_tokens, packing)
        make = pack if packing else (lambda items: collate(items, pad_id))
        self.batches = [(make([rows[i] for i in g]), [categories[i] for i in g]) for g in groups]
        for batch, _ in self.batches if shared else []:
            batch["position_ids"] += shared  # the positions the tokens have behind the prefix
        self.order = [i for g in groups for i in g]  # batch order -> example position (for per-example output)
        self.size = len(examples)
        self.examples, self.categories = examples, categories
        self.batching = {"batch_size": batch_size, "packing": packing, "max_tokens": max_tokens, "precision": precision,
                         "shared_prefix": shared}
        self.autocast_dtype = AUTOCAST[precision]  # the forward's precision, as training's (client/optim.py)

    def cache_key(self) -> dict:
        """What this evaluation's result depends on besides the model (evaluation/base_cache.py)."""
        return {"kind": "held-out", "rows": encoded_digest(self.examples, self.categories), **self.batching}

    @torch.inference_mode()
    def evaluate(self, model, progress: Optional[Progress] = None, phase: str = HELDOUT, per_example: bool = False) -> dict:
        """{"loss", "ppl", "tokens", "examples", "per_category": {cat: {"loss", "ppl", "examples"}}};
        ``progress`` sees a phase named ``phase`` advanced per batch. With ``per_example``, also
        ``"per_example": {"nll": [...], "tokens": [...]}``: each example's summed response-token
        NLL and its response-token count, in the order of the examples given (for paired
        bootstrap intervals, evaluation/bootstrap.py)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        nll_by: dict[str, float] = defaultdict(float)
        tok_by: dict[str, int] = defaultdict(int)
        n_by: dict[str, int] = defaultdict(int)
        rows: list[tuple[float, int]] = []  # (nll sum, tokens) per example, in batch order
        with (progress or Progress()).phase(phase, len(self.batches)) as shown:
            prefix = None
            if self.prefix is not None:  # run once: every example attends to it
                with autocast(device, self.autocast_dtype):
                    prefix = prefix_states(model, self.prefix.to(device))
            for batch, cats in self.batches:
                batch = to_device(batch, device)
                with autocast(device, self.autocast_dtype):
                    nll, tokens = sequence_nll(model, **batch, prefix=prefix)  # (b,), (b,): per example, padded or packed
                for cat, n, t in zip(cats, nll.tolist(), tokens.tolist()):
                    nll_by[cat] += n
                    tok_by[cat] += t
                    n_by[cat] += 1
                    rows.append((n, t))
                shown.advance()
        model.train(was_training)
        total_nll, total_tok = sum(nll_by.values()), sum(tok_by.values())
        result = {
            **_loss_ppl(total_nll, total_tok),
            "tokens": total_tok,
            "examples": self.size,
            "per_category": {c: {**_loss_ppl(nll_by[c], tok_by[c]), "examples": n_by[c]} for c in sorted(nll_by)},
        }
        if per_example:
            result["per_example"] = _in_example_order(rows, self.order)
        return result


def _in_example_order(rows: list[tuple[float, int]], order: list[int]) -> dict[str, list]:
    """{"nll", "tokens"} lists indexed by example position; ``rows[k]`` is example ``order[k]``."""
    nll, tokens = [0.0] * len(order), [0] * len(order)
    for (n, t), i in zip(rows, order):
        nll[i], tokens[i] = n, t
    return {"nll": nll, "tokens": tokens}


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Training's forward precision context (a no-op for fp32, ``dtype`` None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _loss_ppl(nll: float, tokens: int) -> dict[str, float]:
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
