"""Direct Preference Optimization of the global adapter on one client's preference pairs.

With policy log-probabilities ``π_w = log π(y_w|x)``, ``π_l = log π(y_l|x)`` of the chosen and
rejected answers (summed over the answer tokens) and the reference's ``ρ_w``, ``ρ_l``:

    h = (π_w − ρ_w) − (π_l − ρ_l)
    sigmoid  −(1−ε)·log σ(βh) − ε·log σ(−βh)          DPO (Rafailov et al. 2023); ε > 0 is
                                                       conservative DPO (Mitchell 2023)
    robust   [−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1−2ε)   robust DPO (Chowdhury et al. 2024)
    hinge    max(0, 1 − βh)                            SLiC-HF (Zhao et al. 2023)
    ipo      (h̄ − 1/(2β))²                             IPO (Azar et al. 2023), with h̄ the same
             difference of per-token mean log-ratios (length-normalised, as trl does)

Implicit rewards ``r_w = β(π_w − ρ_w)``, ``r_l = β(π_l − ρ_l)``; margin ``r_w − r_l``; reward
accuracy ``1[r_w > r_l]`` with ties counted ½ (a policy equal to its reference is at chance).

The reference policy is the same shared model, never a copy: with the adapter disabled
(``base``) or with a given adapter loaded (the run's initial adapter, or the round's global
one). Reference log-probs are computed once per fit, before training, for the pairs the fit
will visit, and dropped when it returns.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from fedtune.client.hooks import LocalTerms
from fedtune.client.optim import AdapterOptimizer, dropout_rng, warmup_lr
from fedtune.data.batching import plan_steps, split_steps
from fedtune.data.preferences import EncodedPair, collate_pairs, pack_pairs
from fedtune.data.prompts import to_device
from fedtune.model.forward import sequence_nll
from fedtune.model.lora import get_adapter, set_adapter
from fedtune.seeding import generator
from fedtune.server.hetlora import client_view
from fedtune.types import Adapter, ClientUpdate

StepCallback = Callable[[int, int, float], None]  # (step, total_steps, loss)
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def preference_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Optional[torch.Tensor] = None,
    rejected_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-pair loss (b,) from summed log-probs (b,) each; ``*_tokens`` (answer lengths) for ipo."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected  # (b,)
    h = chosen_ratio - rejected_ratio  # (b,)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        mean_h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)  # (b,)
        return (mean_h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")  # config validates first


def pair_stats(losses, chosen, rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair metrics (each (b,), detached): loss, rewards, margin, accuracy, log-probs."""
    chosen_reward = beta * (chosen - ref_chosen).detach()
    rejected_reward = beta * (rejected - ref_rejected).detach()
    wins = (chosen_reward > rejected_reward).float() + 0.5 * (chosen_reward == rejected_reward).float()
    return {
        "loss": losses.detach(),
        "reward_accuracy": wins,
        "margin": chosen_reward - rejected_reward,
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "chosen_logp": chosen.detach(),
        "rejected_logp": rejected.detach(),
    }


def mean_stats(rows: Sequence[dict[str, torch.Tensor]], mask: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Means of per-pair metrics gathered batch by batch (over the pairs where ``mask``)."""
    out = {}
    for key in rows[0]:
        values = torch.cat([r[key].float().cpu() for r in rows])
        out[key] = float(values[mask].mean() if mask is not None else values.mean())
    return out


def pair_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected log-probs, chosen, rejected answer tokens), each (b,), for a batch of
    2b sequences from :func:`collate_pairs` or :func:`pack_pairs` (one forward for both answers)."""
    nll, tokens = sequence_nll(model, **batch)  # (2b,), (2b,)
    chosen, rejected = (-nll).chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    return chosen, rejected, chosen_tokens, rejected_tokens


@contextmanager
def reference_policy(model, params: dict[str, torch.nn.Parameter], adapter: Optional[Adapter]) -> Iterator[None]:
    """The shared model as the reference policy: adapter disabled (``adapter`` None) or
    ``adapter`` loaded; the live adapter is back in place afterwards."""
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    live = get_adapter(params)
    set_adapter(params, adapter)
    try:
        yield
    finally:
        set_adapter(params, live)


@torch.no_grad()
def reference_logps(
    model, params, batches: Sequence[dict[str, torch.Tensor]], adapter: Optional[Adapter], autocast=nullcontext,
    on_batch: Optional[Callable[[], None]] = None,
) -> list[torch.Tensor]:
    """Reference log-probs of each batch of pairs: one (b, 2) tensor [chosen, rejected] per batch;
    ``on_batch`` is called after each (progress)."""
    was_training = model.training
    model.eval()  # no dropout: the reference is deterministic
    device = next(iter(params.values())).device
    out = []
    with reference_policy(model, params, adapter):
        for batch in batches:
            with autocast():
                chosen, rejected, _, _ = pair_logps(model, to_device(batch, device))
            out.append(torch.stack([chosen, rejected], dim=1).float())  # (b, 2)
            if on_batch is not None:
                on_batch()
    model.train(was_training)
    return out


class PreferenceTrainer:
    """Local DPO: the interface and step mechanics of :class:`~fedtune.client.sft.LocalTrainer`
    (AdamW, warm-up, gradient accumulation, clipping, seeded dropout), with the loss above."""

    def __init__(
        self,
        model,
        params: dict[str, torch.nn.Parameter],
        *,
        pad_id: int,
        batch_size: int,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference: str = "initial",
        initial_adapter: Optional[Adapter] = None,
        grad_accum: int = 1,
        local_epochs: int = 1,
        local_steps: Optional[int] = None,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        by_length: bool = True,
        max_tokens: Optional[int] = None,
        packing: bool = False,
        precision: str = "fp32",
        seed: int = 0,
    ):
        if reference == "initial" and initial_adapter is None:
            raise ValueError("reference='initial' needs initial_adapter")  # internal: setup passes it
        self.model, self.params, self.pad_id = model, params, pad_id
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference, self.initial_adapter = reference, initial_adapter
        self.batch_size, self.grad_accum, self.local_epochs, self.local_steps = batch_size, grad_accum, local_epochs, local_steps
        self.warmup_steps, self.by_length, self.max_tokens, self.seed = warmup_steps, by_length, max_tokens, seed
        self.packing = packing
        self.device = next(iter(params.values())).device
        self.optimizer = AdapterOptimizer(params, weight_decay=weight_decay, max_grad_norm=max_grad_norm, precision=precision)

    def plan(self, client_id: int, round: int, pairs: Sequence[EncodedPair], local_steps: Optional[int] = None) -> list[list[list[int]]]:
        """The client's optimizer steps this round (positions into ``pairs``)."""
        rng = generator(self.seed, "batches", round, client_id)
        steps = plan_steps(
            [p.length for p in pairs], self.batch_size, self.grad_accum, rng,
            epochs=self.local_epochs, max_steps=self.local_steps if local_steps is None else local_steps, by_length=self.by_length,
        )
        sizes = [p.length if self.packing else p.padded_length for p in pairs]
        return split_steps(steps, sizes, self.max_tokens, packed=self.packing)

    def reference_adapter(self, global_adapter: Adapter) -> Optional[Adapter]:
        """The adapter the reference policy uses this round (None: the base model)."""
        return {"base": None, "initial": self.initial_adapter, "global": global_adapter}[self.reference]

    def fit(
        self,
        client_id: int,
        pairs: Sequence[EncodedPair],
        global_adapter: Adapter,
        *,
        round: int,
        lr: float,
        client_config: Optional[dict] = None,
        client_control: Optional[Adapter] = None,
        local_steps: Optional[int] = None,
        rank: Optional[int] = None,
        on_step: Optional[StepCallback] = None,
    ) -> ClientUpdate:
        """Train from ``global_adapter`` on ``pairs``; return the adapter delta and DPO metrics.

        ``client_config``/``client_control`` switch on FedProx/SCAFFOLD exactly as for SFT
        (client/hooks.py); ``local_steps`` overrides the trainer's own (heterogeneous clients);
        ``rank`` trains a truncated adapter as for SFT (HetLoRA)."""
        start = time.perf_counter()
        global_adapter, mask = client_view(global_adapter, rank)  # HetLoRA: only the first ``rank`` slices
        set_adapter(self.params, global_adapter)
        terms = LocalTerms.build(global_adapter, client_config, client_control, self.device)
        steps = self.plan(client_id, round, pairs, local_steps)
        ref = self.reference_of(pairs, steps, self.reference_adapter(global_adapter))
        reference_seconds = time.perf_counter() - start
        self.optimizer.reset(mask)
        self.model.train()
        rows: list[dict[str, torch.Tensor]] = []
        tokens = real = padded = 0
        with dropout_rng(self.seed, round, client_id, self.device):
            for i, step in enumerate(steps):
                batches = [(self.make_batch([pairs[j] for j in m]), torch.stack([ref[j] for j in m])) for m in step]
                step_rows = self._step(batches, warmup_lr(lr, i, self.warmup_steps), terms)
                rows.extend(step_rows)
                tokens += sum(int((b["labels"][:, 1:] != -100).sum()) for b, _ in batches)
                real += sum(pairs[j].length for m in step for j in m)
                padded += sum(b["input_ids"].numel() for b, _ in batches)
                if on_step is not None:
                    on_step(i + 1, len(steps), float(torch.cat([r["loss"] for r in step_rows]).mean()))
        local = get_adapter(self.params)
        delta = {k: local[k] - global_adapter[k] for k in local}
        metrics = {
            **(mean_stats(rows) if rows else {"loss": 0.0}),
            "steps": len(steps),
            "tokens": tokens,
            "real_tokens": real,
            "padded_tokens": padded,
            "lr": lr,
            "reference_seconds": reference_seconds,
            "seconds": time.perf_counter() - start,
        }
        control_delta = terms.control_delta() if terms is not None else None
        return ClientUpdate(client_id, len(pairs), delta, metrics, control_delta)

    def reference_of(self, pairs: Sequence[EncodedPair], steps: list, adapter: Optional[Adapter]) -> dict[int, torch.Tensor]:
        """Reference log-probs [chosen, rejected] of each pair the fit will visit, computed
        once before training (batched by length)."""
        visited = sorted({j for step in steps for m in step for j in m}, key=lambda j: pairs[j].length)
        chunks = [visited[s : s + self.batch_size] for s in range(0, len(visited), self.batch_size)]
        batches = [self.make_batch([pairs[j] for j in c]) for c in chunks]
        refs = reference_logps(self.model, self.params, batches, adapter, self.optimizer.autocast)
        return {j: row for c, r in zip(chunks, refs) for j, row in zip(c, r)}  # pair -> (2,)

    def make_batch(self, items: list[EncodedPair]) -> dict[str, torch.Tensor]:
        """The 2b sequences of ``items`` (chosen, then rejected): packed in one row, or padded."""
        return pack_pairs(items) if self.packing else collate_pairs(items, self.pad_id)

    def _step(self, batches: list[tuple[dict, torch.Tensor]], lr: float, terms: Optional[LocalTerms] = None) -> list[dict[str, torch.Tensor]]:
        """One optimizer step over micro-batches of (pairs, reference log-probs); the loss is
        the mean over the step's pairs. Returns per-pair metrics."""
        n_pairs = sum(int(ref.shape[0]) for _, ref in batches)
        rows = []
        for batch, ref in batches:
            batch = to_device(batch, self.device)
            ref = ref.to(self.device)  # (b, 2)
            with self.optimizer.autocast():
                chosen, rejected, chosen_tokens, rejected_tokens = pair_logps(self.model, batch)  # (b,) each
            losses = preference_loss(
                chosen, rejected, ref[:, 0], ref[:, 1], beta=self.beta, loss_type=self.loss_type,
                label_smoothing=self.label_smoothing, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
            )  # (b,)
            self.optimizer.backward(losses.sum() / n_pairs)
            rows.append(pair_stats(losses, chosen, rejected, ref[:, 0], ref[:, 1], self.beta))
        self.optimizer.step(lr, terms)
        return rows
