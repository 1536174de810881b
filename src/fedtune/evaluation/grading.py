"""LLM-as-judge grading: the rubric prompts, parsing the judge's verdicts, and the scores.

Two protocols, after MT-Bench (Zheng et al., 2023, "Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena", prompts ``single-v1`` and ``pair-v2``):

* **Single-answer grading.** The judge rates one answer from 1 to 10 and writes the rating as
  ``[[7]]``. Every candidate's answers and the reference answers are rated the same way, and a
  candidate's **relative score** is, as in Vicuna and FedIT (Zhang et al., 2024, "Towards
  Building the Federated GPT: Federated Instruction Tuning", which scores each model relative
  to a reference model's answers)::

      relative = sum_i s_cand(i) / sum_i s_ref(i)      over questions i where both were rated

* **Pairwise comparison.** The judge sees the question and two answers and writes ``[[A]]``,
  ``[[B]]`` or ``[[C]]`` (tie). Each question is judged twice with the positions swapped
  (candidate as A, then as B) to cancel position bias; a candidate **wins** when both orders
  prefer it, **loses** when both prefer the reference, and ties otherwise (MT-Bench's
  conservative rule). A reply with no verdict, or with contradicting verdicts, counts as
  ``unparsed`` and is left out of wins/ties/losses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

SYSTEM = "You are a helpful and precise assistant for checking the quality of answers."

SINGLE_RUBRIC = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant "
    "to the user question displayed below. Consider correctness first (a wrong answer scores at most 3), then "
    "helpfulness, relevance, level of detail and whether it follows the instruction's requested format. Be as "
    "objective as possible; do not let the length of the response influence you. Begin with a short explanation, "
    'then rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: '
    '"Rating: [[5]]".\n\n[Question]\n{question}\n\n[The Start of Assistant\'s Answer]\n{answer}\n'
    "[The End of Assistant's Answer]"
)

PAIR_RUBRIC = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. Choose the assistant that follows the user's instructions and answers "
    "the question better, considering correctness first, then helpfulness, relevance and level of detail. Avoid "
    "any position bias: the order of the responses must not influence you, nor their length or the assistants' "
    "names. Begin with a short explanation, then output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.\n\n'
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
)

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")  # [[7]], [[7/10]]
# Rating: 7, rating is 7/10, **Rating:** 8, Rating: **8** (markdown bold, as chat models write)
_RATING_LOOSE = re.compile(r"\brating[\s*]*(?:is|of|:|=)?[\s*]*\[?\s*(\d+(?:\.\d+)?)\s*\]?\**\s*(?:/\s*10)?", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def single_messages(question: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": SINGLE_RUBRIC.format(question=question, answer=answer)}]


def pair_messages(question: str, a: str, b: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PAIR_RUBRIC.format(question=question, a=a, b=b)}]


def parse_rating(reply: str) -> Optional[float]:
    """The 1-10 rating in a judge reply, or None when it has none, several different ones,
    or one outside 1-10 (the caller counts it as missing). ``[[7]]`` is the format asked for
    (``[[7/10]]`` too); ``Rating: 7``, ``rating: 7/10`` and ``**Rating:** 7`` are accepted
    when no ``[[...]]`` rating is present."""
    found = {float(x) for x in _RATING.findall(reply)} or {float(x) for x in _RATING_LOOSE.findall(reply)}
    if len(found) != 1:
        return None
    (value,) = found
    return value if 1.0 <= value <= 10.0 else None


def parse_verdict(reply: str) -> Optional[str]:
    """"A", "B" or "tie" ([[C]]) from a pairwise judge reply; None when absent or contradictory."""
    found = set(_VERDICT.findall(reply))
    if len(found) != 1:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found.pop()]


def combine_swapped(candidate_first: Optional[str], candidate_second: Optional[str]) -> Optional[str]:
    """Outcome for the candidate from two verdicts: the candidate was A in the first
    judgement and B in the second. "win", "loss", "tie", or None if either is unparsed."""
    if candidate_first is None or candidate_second is None:
        return None
    first = {"A": 1, "B": -1, "tie": 0}[candidate_first]  # +1: the candidate is preferred
    second = {"B": 1, "A": -1, "tie": 0}[candidate_second]
    if first == second == 1:
        return "win"
    if first == second == -1:
        return "loss"
    return "tie"


def relative_score(candidate: Sequence[Optional[float]], reference: Sequence[Optional[float]]) -> dict:
    """Σ candidate / Σ reference ratings over the questions where both were parsed."""
    pairs = [(c, r) for c, r in zip(candidate, reference) if c is not None and r is not None]
    cand, ref = sum(c for c, _ in pairs), sum(r for _, r in pairs)
    rated = [c for c in candidate if c is not None]
    return {
        "mean": sum(rated) / len(rated) if rated else None,
        "candidate_total": cand,
        "reference_total": ref,
        "relative": cand / ref if ref > 0 else None,
        "pairs": len(pairs),
        "unparsed": sum(c is None for c in candidate),
    }


def win_tie_loss(outcomes: Sequence[Optional[str]]) -> dict:
    """Counts of win/tie/loss/unparsed and the win rate (win + tie/2) / decided."""
    counts = {k: sum(o == k for o in outcomes) for k in ("win", "tie", "loss")}
    decided = sum(counts.values())
    return {**counts, "unparsed": sum(o is None for o in outcomes),
            "win_rate": (counts["win"] + 0.5 * counts["tie"]) / decided if decided else None}


@dataclass
class Question:
    text: str  # the instruction, with its input after a blank line
    reference: str  # the reference answer


def grade(
    complete: Callable[[list[dict]], str],
    questions: Sequence[Question],
    answers: dict[str, Sequence[str]],
    *,
    protocol: str = "both",
    on_model: Optional[Callable[[str], None]] = None,
) -> dict:
    """Grade each model's answers against the reference answers.

    ``complete(messages) -> reply`` is the judge (e.g. :meth:`JudgeClient.complete`);
    ``protocol`` is "single", "pairwise" or "both". Returns ``{"reference_ratings": [...],
    "models": {model: {"single": relative_score + "ratings", "pairwise": win_tie_loss + "outcomes"}}}``.
    """
    models: dict = {}
    ref_ratings: list[Optional[float]] = []
    if protocol in ("single", "both"):
        ref_ratings = [parse_rating(complete(single_messages(q.text, q.reference))) for q in questions]
    for model, texts in answers.items():
        if on_model is not None:
            on_model(model)
        result: dict = {}
        if protocol in ("single", "both"):
            ratings = [parse_rating(complete(single_messages(q.text, a))) for q, a in zip(questions, texts)]
            result["single"] = {**relative_score(ratings, ref_ratings), "ratings": ratings}
        if protocol in ("pairwise", "both"):
            outcomes = [
                combine_swapped(parse_verdict(complete(pair_messages(q.text, a, q.reference))),
                                parse_verdict(complete(pair_messages(q.text, q.reference, a))))
                for q, a in zip(questions, texts)
            ]
            result["pairwise"] = {**win_tie_loss(outcomes), "outcomes": outcomes}
        models[model] = result
    return {"reference_ratings": ref_ratings, "models": models}
