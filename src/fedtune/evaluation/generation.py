"""Generation metrics: answers to held-out prompts scored against their references.

ROUGE-L (Lin, 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", sec. 3) is the
F-measure of the longest common subsequence (LCS) of candidate and reference tokens:

    P = LCS(c, r) / |c|,    R = LCS(c, r) / |r|,    F = 2 P R / (P + R)    (beta = 1; 0 if LCS = 0)

Tokenisation follows the ``rouge-score`` package's default tokenizer without stemming: lower-case,
every run of characters outside ``[a-z0-9]`` becomes a space, split on whitespace. So
``"The capital of France is Paris."`` is ``[the, capital, of, france, is, paris]``.

Exact match (EM) compares answers after SQuAD-style normalisation (Rajpurkar et al., 2016):
lower-case, drop punctuation and the articles a/an/the, collapse whitespace. The demo data's
answers are templated ("A cow says 'moo'."), so EM is meaningful there; on free-form data it
is near zero and ROUGE-L is the metric to read.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Sequence

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def rouge_tokens(text: str) -> list[str]:
    """Tokens for ROUGE: lower-cased runs of ``[a-z0-9]`` (rouge-score's default, no stemmer)."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(|a| |b|) time and O(|b|) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F-measure of one candidate against one reference."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f": 0.0}
    p, rec = lcs / len(c), lcs / len(r)
    return {"precision": p, "recall": rec, "f": 2 * p * rec / (p + rec)}


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(candidate: str, reference: str) -> float:
    return float(normalize_answer(candidate) == normalize_answer(reference))


def score_answers(answers: Sequence[str], references: Sequence[str], categories: Sequence[str]) -> dict:
    """Mean ROUGE-L F and exact match over all answers and per category.

    Returns ``{"rouge_l", "exact_match", "examples", "per_category": {cat: {...same}}}``
    (each a mean over that group's examples, in [0, 1]).
    """
    if not (len(answers) == len(references) == len(categories)):
        raise ValueError("answers, references and categories must have the same length")  # internal
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for a, r, c in zip(answers, references, categories):
        rl, em = rouge_l(a, r)["f"], exact_match(a, r)
        for key in ("all", f"cat:{c}"):
            s = sums[key]
            s[0], s[1], s[2] = s[0] + rl, s[1] + em, s[2] + 1

    def means(s: list[float]) -> dict:
        n = max(int(s[2]), 1)
        return {"rouge_l": s[0] / n, "exact_match": s[1] / n, "examples": int(s[2])}

    overall = means(sums["all"]) if answers else {"rouge_l": 0.0, "exact_match": 0.0, "examples": 0}
    per = {k[4:]: means(v) for k, v in sorted(sums.items()) if k.startswith("cat:")}
    return {**overall, "per_category": per}


def pick_generation_subset(categories: Sequence[str], limit: int | None) -> list[int]:
    """Positions to answer, in round-robin order over the categories (first rows of each
    category, then the second ...), cut at ``limit`` (None: all). Any prefix of the result is
    as balanced across categories as it can be, so judging or showing the first k answers
    covers every category. Deterministic."""
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        by_cat[c].append(i)
    queues = [by_cat[c] for c in sorted(by_cat)]
    order = [q[depth] for depth in range(max(map(len, queues), default=0)) for q in queues if depth < len(q)]
    return order if limit is None else order[:limit]
