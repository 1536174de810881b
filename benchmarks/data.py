"""Deterministic benchmark data with the length profile of Databricks Dolly-15k.

Dolly rows: a short instruction; a context passage for about a third of the rows (closed QA,
information extraction, summarisation); responses from one word to several paragraphs with a
long tail. Words are drawn from a fixed vocabulary, so token counts are realistic while the
content is not; pass a real file to the benchmarks to measure on real text instead.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from his her an which be this are or were "
    "it has had not but also have they their one two first new after who its been more other into "
    "time when can than only some these may most over such many about where state would city system "
    "water river music family school world people government history company science power energy "
    "language number series early known during between because under while later since often film "
    "species region village population football country national university century history war"
).split()
CATEGORIES = ("open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
              "information_extraction", "summarization", "creative_writing")
WITH_CONTEXT = {"closed_qa", "information_extraction", "summarization"}


def _text(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(max(1, n))]
    return " ".join(words).capitalize() + "."


def dolly_like_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        cat = rng.choice(CATEGORIES)
        context = _text(rng, int(rng.lognormvariate(4.4, 0.6))) if cat in WITH_CONTEXT else ""
        rows.append({
            "instruction": _text(rng, int(rng.lognormvariate(2.5, 0.5))),
            "context": context,
            "response": _text(rng, int(rng.lognormvariate(3.7, 0.9))),
            "category": cat,
        })
    return rows


def write_dolly_like(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in dolly_like_rows(n, seed)))
    return path
