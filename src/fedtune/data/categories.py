"""Categories derived from the rows themselves, for data with no category column (Alpaca).

A category lets the non-IID splits (``partition.method=shards`` / ``dirichlet``) skew clients by
task, and the held-out set and tables report per category. Alpaca has none, so fedtune can take
the instruction's first word ("generate", "explain", "rewrite", ...), the verb that names the task
as in the Alpaca paper's verb-noun breakdown. Pure functions of the examples.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # sources applies these while loading
    from fedtune.data.sources import Example

OTHER = "other"

_WORD = re.compile(r"[a-z0-9']+")


def first_word(instruction: str) -> str:
    """The instruction's first word, lower-cased, without punctuation ('' when it has none)."""
    match = _WORD.search(instruction.lower())
    return match.group(0) if match else ""


def first_word_categories(examples: Sequence[Example], top: int) -> list[Example]:
    """Each example with its category set to its instruction's first word when that word is one
    of the ``top`` most frequent first words (ties by the word), else ``other``."""
    words = [first_word(e.instruction) for e in examples]
    counts = Counter(w for w in words if w)
    kept = {w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:top]}
    return [dataclasses.replace(e, category=w if w in kept else OTHER) for e, w in zip(examples, words)]
