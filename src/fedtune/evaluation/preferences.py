"""Held-out preference evaluation of the model as it stands against a fixed reference policy.

On a held-out set of preference pairs: the DPO loss (as in training), the reward accuracy
(share of pairs whose implicit reward ``β·(log π − log π_ref)`` is higher for the chosen
answer; ties count ½), the mean reward margin, the mean rewards and log-probs of both answers,
overall and per category. The reference log-probs are computed once, on first use, and kept
(a fixed set: its size does not grow with the number of clients or rounds).

Batches are built once as training builds them (evaluation/heldout.py ``eval_groups``): both
answers of each pair packed into one row with per-example attention (``packing``), or padded.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from fedtune.client.optim import AUTOCAST
from fedtune.client.dpo import mean_stats, pair_logps, pair_stats, preference_loss, reference_logps
from fedtune.data.preferences import EncodedPair, collate_pairs, pack_pairs
from fedtune.data.prompts import to_device
from fedtune.evaluation.base_cache import encoded_digest, is_noop
from fedtune.evaluation.heldout import autocast, eval_groups
from fedtune.reporting.progress import HELDOUT, REFERENCE, Progress
from fedtune.types import Adapter


class PreferenceEvaluator:
    """Evaluates on a fixed set of pairs; batches are built once (sorted by length)."""

    def __init__(
        self,
        pairs: Sequence[EncodedPair],
        categories: Sequence[str],
        *,
        params: dict[str, torch.nn.Parameter],
        reference_adapter: Optional[Adapter],
        batch_size: int,
        pad_id: int,
        beta: float,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        packing: bool = False,
        max_tokens: Optional[int] = None,
        precision: str = "fp32",
    ):
        sizes = [p.length if packing else p.padded_length for p in pairs]
        chunks = eval_groups(sizes, batch_size, max_tokens, packing)
        make = pack_pairs if packing else (lambda items: collate_pairs(items, pad_id))
        self.batches = [make([pairs[i] for i in c]) for c in chunks]
        self.categories = [categories[i] for c in chunks for i in c]  # in batch order
        self.order = [i for c in chunks for i in c]  # batch order -> pair position (for per-example output)
        self.params, self.reference_adapter = params, reference_adapter
        self.loss = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        self.reference: Optional[list[torch.Tensor]] = None
        self.size = len(pairs)
        self.pairs, self.pair_categories = pairs, categories
        self.batching = {"batch_size": batch_size, "packing": packing, "max_tokens": max_tokens, "precision": precision}
        self.autocast = functools.partial(autocast, next(iter(params.values())).device, AUTOCAST[precision])  # as training

    def cache_key(self) -> Optional[dict]:
        """What this evaluation's result for the base model depends on besides the model
        (evaluation/base_cache.py); None when the reference is not the base model."""
        if self.reference_adapter is not None and not is_noop(self.reference_adapter):
            return None
        return {"kind": "preference", "rows": encoded_digest(self.pairs, self.pair_categories), "reference": "base",
                **self.loss, **self.batching}

    @torch.no_grad()
    def evaluate(self, model, progress: Optional[Progress] = None, phase: str = HELDOUT, per_example: bool = False) -> dict:
        """{"loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp",
        "rejected_logp", "examples", "per_category": {cat: {... "examples"}}}; ``progress`` sees
        a phase named ``phase`` advanced per batch (after the reference's, on first use). With
        ``per_example``, also ``"per_example": {"reward_accuracy": [...], "margin": [...]}`` per
        pair (1, ½ or 0; the reward margin), in the order of the pairs given (for paired
        bootstrap intervals, evaluation/gaps.py accuracy_gap)."""
        progress = progress or Progress()
        if self.reference is None:
            with progress.phase(REFERENCE, len(self.batches)) as shown:
                self.reference = reference_logps(model, self.params, self.batches, self.reference_adapter, self.autocast,
                                                 on_batch=shown.advance)
        was_training = model.training
        model.eval()
        device = next(iter(self.params.values())).device
        rows = []
        with progress.phase(phase, len(self.batches)) as shown:
            for batch, ref in zip(self.batches, self.reference):
                with self.autocast():
                    chosen, rejected, chosen_tokens, rejected_tokens = pair_logps(model, to_device(batch, device))
                ref = ref.to(device)  # (b, 2)
                losses = preference_loss(
                    chosen, rejected, ref[:, 0], ref[:, 1], chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens, **self.loss
                )
                rows.append(pair_stats(losses, chosen, rejected, ref[:, 0], ref[:, 1], self.loss["beta"]))
                shown.advance()
        model.train(was_training)
        cats = sorted(set(self.categories))
        per_category = {}
        for cat in cats:
            mask = torch.tensor([c == cat for c in self.categories])
            per_category[cat] = {**mean_stats(rows, mask), "examples": int(mask.sum())}
        result = {**mean_stats(rows), "examples": self.size, "per_category": per_category}
        if per_example:
            result["per_example"] = {key: _in_pair_order(rows, key, self.order) for key in ("reward_accuracy", "margin")}
        return result


def _in_pair_order(rows: list[dict], key: str, order: list[int]) -> list[float]:
    values = torch.cat([r[key].float().cpu() for r in rows]).tolist()  # batch order
    out = [0.0] * len(order)
    for v, i in zip(values, order):
        out[i] = v
    return out
