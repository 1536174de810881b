"""Which held-out rows a run answers before and after training, to show what improved.

A run that has not been given ``eval.sample_prompts`` shows held-out rows from the categories
whose held-out loss fell most over the run (``after − before`` per category, most negative
first; ties by name), one row per category in that order, then a second row of each, ... up to
``eval.num_samples``. Within a category, rows are taken in held-out order, so the pick is
deterministic. Since the fall is known only after training, both answers are generated then:
"before" with the starting adapter, "after" with the final one (no more generation than
answering at round 0 and at the end). Pure functions.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Optional, Sequence, Union

from fedtune.data.preferences import PreferencePair
from fedtune.data.sources import Example


def loss_changes(before: Optional[Mapping], after: Optional[Mapping]) -> dict[str, float]:
    """``{category: after − before held-out loss}`` for the categories both evaluations have."""
    if not before or not after:
        return {}
    b, a = before.get("per_category", {}), after.get("per_category", {})
    return {c: a[c]["loss"] - b[c]["loss"] for c in b if c in a and "loss" in a[c] and "loss" in b[c]}


def as_sample(record: Union[Example, PreferencePair]) -> Optional[dict]:
    """A held-out row as a sample prompt (``prompt``, ``input``, ``reference``, ``category``);
    None for a multi-turn preference pair (the sample answers are single-turn)."""
    if isinstance(record, PreferencePair):
        if len(record.prompt) != 1:
            return None
        return {"prompt": record.prompt[0][1], "input": "", "reference": record.chosen, "category": record.category}
    return {"prompt": record.instruction, "input": record.input, "reference": record.output, "category": record.category}


def pick_samples(records: Sequence, holdout: Sequence[int], k: int, changes: Optional[Mapping[str, float]] = None) -> list[dict]:
    """Up to ``k`` held-out rows: round-robin over the categories, most-improved first when
    ``changes`` (:func:`loss_changes`) is given, else in order of first appearance. With
    ``changes``, each sample carries its category's ``loss_change``."""
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for i in holdout:
        sample = as_sample(records[i])
        if sample is not None:
            by_cat[sample["category"]].append(sample)
    cats = list(by_cat)  # first appearance
    if changes:
        cats.sort(key=lambda c: (_or_inf(changes.get(c)), c))
    picked: list[dict] = []
    for depth in range(max((len(v) for v in by_cat.values()), default=0)):
        for c in cats:
            if len(picked) < k and depth < len(by_cat[c]):
                extra = {"loss_change": changes[c]} if changes and c in changes else {}
                picked.append({**by_cat[c][depth], **extra})
    return picked


def _or_inf(change: Optional[float]) -> float:
    """A category's loss change as a sort key: unknown or nan (a diverged evaluation) last."""
    return float("inf") if change is None or change != change else change


def samples_headline(samples: Sequence[dict]) -> Optional[str]:
    """"samples from the held-out categories whose held-out loss fell most over the run:
    arithmetic (-0.90 nats), ..." for samples picked by loss change; categories whose loss did
    not fall are named as such (never under "fell"); None for samples not picked by change."""
    seen: dict[str, float] = {}
    for s in samples:
        if "loss_change" in s:
            seen.setdefault(s["category"], s["loss_change"])
    if not seen:
        return None
    fell = ", ".join(f"{c} ({v:+.2f} nats)" for c, v in seen.items() if v < 0)
    rest = ", ".join(f"{c} ({v:+.2f} nats)" for c, v in seen.items() if not v < 0)
    if not fell:
        return f"held-out loss fell in none of the sampled categories over the run; samples from those where it rose least: {rest}"
    line = f"samples from the held-out categories whose held-out loss fell most over the run: {fell}"
    return f"{line}; then from categories where it did not fall: {rest}" if rest else line
