"""Held-out loss and perplexity of the model as it stands, overall and per category.

Loss is the mean negative log-likelihood per response token (token-weighted, as in
training); perplexity is its exponential.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

import torch

from fedtune.data.prompts import Encoded, collate
from fedtune.model.forward import sequence_nll
from fedtune.reporting.progress import HELDOUT, Progress


class HeldoutEvaluator:
    """Evaluates on a fixed set; batches are built once (sorted by length, little padding)."""

    def __init__(self, examples: Sequence[Encoded], categories: Sequence[str], *, batch_size: int, pad_id: int):
        order = sorted(range(len(examples)), key=lambda i: int(examples[i].input_ids.numel()))
        self.batches = [
            (collate([examples[i] for i in order[s : s + batch_size]], pad_id), [categories[i] for i in order[s : s + batch_size]])
            for s in range(0, len(order), batch_size)
        ]
        self.order = order  # batch order -> example position (for per-example output)
        self.size = len(examples)

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
            for batch, cats in self.batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                nll, tokens = sequence_nll(model, **batch)  # (b,), (b,)
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


def _loss_ppl(nll: float, tokens: int) -> dict[str, float]:
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
