"""The LLM-judge results in the FedIT format (Zhang et al., 2024, "Towards Building the Federated
GPT: Federated Instruction Tuning", sec. 4: each model's score relative to a reference, and its
wins/ties/losses against it).

For each judged model m, over the questions where both m's and the reference's 1-10 ratings
parsed (evaluation/grading.py):

    relative score(m) = Σ_i rating_m(i) / Σ_i rating_ref(i)          (the reference is 100%)

and win/tie/loss from the pairwise verdicts in both orders. A rating or verdict the judge
wrote in no readable format counts as missing: it is left out of the sums and counted in the
"unparsed" columns, so a reader sees how much of the table rests on parsed judgements.
"""

from __future__ import annotations

from typing import Optional, Sequence

HEADERS = ("model", "relative score", "mean rating", "rated", "unparsed ratings", "wins", "ties", "losses", "unparsed verdicts")


def fedit_rows(judged: dict, reference_ratings: Sequence[Optional[float]], reference: str) -> list[dict]:
    """One row per judged model (as ``HEADERS``), then the reference's row (relative 1.0)."""
    rows = []
    for model, j in judged.items():
        single, pair = j.get("single") or {}, j.get("pairwise") or {}
        rows.append({
            "model": model, "relative": single.get("relative"), "mean": single.get("mean"), "rated": single.get("pairs"),
            "unparsed_ratings": single.get("unparsed"), "win": pair.get("win"), "tie": pair.get("tie"), "loss": pair.get("loss"),
            "unparsed_verdicts": pair.get("unparsed"),
        })
    if reference_ratings:
        parsed = [r for r in reference_ratings if r is not None]
        rows.append({"model": reference_name(reference), "relative": 1.0 if parsed else None,
                     "mean": sum(parsed) / len(parsed) if parsed else None, "rated": len(parsed),
                     "unparsed_ratings": len(reference_ratings) - len(parsed), "win": None, "tie": None, "loss": None,
                     "unparsed_verdicts": None})
    return rows


def reference_name(reference: str) -> str:
    return "reference answers (data)" if reference == "data" else f"{reference} (reference)"


def cells(row: dict) -> list[str]:
    """The row as text, in ``HEADERS`` order ("-" for what was not measured)."""
    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rel = "-" if row["relative"] is None else f"{100 * row['relative']:.1f}%"
    return [row["model"], rel, num(row["mean"], ".2f"), num(row["rated"], "d"), num(row["unparsed_ratings"], "d"),
            num(row["win"], "d"), num(row["tie"], "d"), num(row["loss"], "d"), num(row["unparsed_verdicts"], "d")]


def unparsed_note(rows: list[dict]) -> Optional[str]:
    """A sentence when some judgements could not be read, else None."""
    ratings = sum(r["unparsed_ratings"] or 0 for r in rows)
    verdicts = sum(r["unparsed_verdicts"] or 0 for r in rows)
    if not ratings and not verdicts:
        return None
    return (f"{ratings} rating(s) and {verdicts} verdict(s) from the judge were in no readable format ([[1-10]], "
            "Rating: N, [[A]]/[[B]]/[[C]]); they count as missing and are left out of the scores")
