"""Federated evaluation: each client scores the global adapter on its own held-out rows and
sends back *sums* and counts (never means), per category; the server adds them up.

A client's sums, per category ``c``, are (``task=sft``)::

    {"examples": n_c, "tokens": t_c, "loss": sum of token NLLs}

or (``task=dpo``) ``{"examples": n_c, "loss": sum over pairs, "reward_accuracy": sum, "margin":
sum, ...}`` (every per-pair metric of the preference evaluator, summed over the pairs). The server's
result, over the clients K that answered, is for every metric m with weight w (tokens for the SFT
loss, a per-token quantity; pairs for every DPO metric, each a per-pair mean)::

    m = sum_{k in K} sum_c S_{k,c}[m] / sum_{k in K} sum_c S_{k,c}[w]

which is exactly what the central evaluator would report on the union of those clients'
held-out rows (the SFT loss is token-weighted there too; ``examples`` counts rows/pairs). The same
formula per category gives ``per_category``, and per client ``per_client``. Perplexity is
``exp(loss)`` (capped as the central evaluator caps it). Pure functions; no model, no I/O.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping, Optional, Sequence

from fedtune.server.sampling import sample_clients
from fedtune.seeding import generator

Sums = dict[str, dict[str, float]]  # category -> {"examples", "tokens" (sft), metric sums}
COUNTS = ("examples", "tokens")  # summed and reported as they are, not divided


def weight_of(task: str) -> str:
    """What a metric sum is divided by: tokens for the SFT loss, pairs (examples) for DPO."""
    return "tokens" if task == "sft" else "examples"


def client_sums(result: dict, task: str, tokens_by_category: Optional[Mapping[str, int]] = None) -> Sums:
    """A client's sums from its evaluator's result (``HeldoutEvaluator`` / ``PreferenceEvaluator``
    on its held-out rows): each per-category mean times its weight. For sft,
    ``tokens_by_category`` gives the response tokens per category (the result has only the total)."""
    out: Sums = {}
    for cat, entry in result["per_category"].items():
        if task == "sft":
            tokens = int(tokens_by_category[cat])
            out[cat] = {"examples": int(entry["examples"]), "tokens": tokens, "loss": float(entry["loss"]) * tokens}
        else:
            n = int(entry["examples"])
            out[cat] = {"examples": n, **{k: float(v) * n for k, v in entry.items() if k != "examples"}}
    if task == "sft":
        assert sum(s["tokens"] for s in out.values()) == result["tokens"], "per-category tokens do not add up to the evaluator's"
    return out


def _add(into: dict[str, float], sums: Mapping[str, float]) -> None:
    for k, v in sums.items():
        into[k] = into.get(k, 0) + v


def means(total: Mapping[str, float], task: str) -> dict:
    """Summed counts and metrics -> the counts and the weighted means (and ppl for sft)."""
    w = weight_of(task)
    weight = total.get(w, 0)
    out = {k: total[k] for k in COUNTS if k in total}
    for k, v in total.items():
        if k not in COUNTS:
            out[k] = v / weight if weight > 0 else None
    if task == "sft" and out.get("loss") is not None:
        out["ppl"] = math.exp(min(out["loss"], 50.0))
    return out


def combine(scores: Mapping[int, Sums], task: str) -> dict:
    """The server's federated evaluation from each client's sums: overall, ``per_category``
    and ``per_client`` weighted means (module docstring), with examples (and tokens) counted.
    Clients are added in ascending id order, so both engines sum the same floats the same way."""
    overall: dict[str, float] = {}
    by_cat: dict[str, dict[str, float]] = defaultdict(dict)
    by_client: dict[str, dict] = {}
    for cid in sorted(scores):
        mine: dict[str, float] = {}
        for cat in sorted(scores[cid]):
            _add(by_cat[cat], scores[cid][cat])
            _add(mine, scores[cid][cat])
        _add(overall, mine)
        by_client[str(cid)] = means(mine, task)
    summary = means(overall, task) if overall else {"examples": 0}
    return {**summary, "per_category": {c: means(by_cat[c], task) for c in sorted(by_cat)}, "per_client": by_client}


def evaluation_clients(num_clients: int, count: Optional[int], seed: int, round: int) -> list[int]:
    """The clients that score round ``round``'s adapter: all, or ``count`` drawn uniformly from
    (seed, "federated-eval", round) (a pure function of the round, so a resumed run agrees)."""
    if count is None or count >= num_clients:
        return list(range(num_clients))
    return sample_clients(num_clients, count, generator(seed, "federated-eval", round))


def tokens_by_category(rows: Sequence, categories: Sequence[str]) -> dict[str, int]:
    """Response tokens per category of encoded SFT rows (``Encoded.response_tokens``)."""
    out: dict[str, int] = defaultdict(int)
    for row, cat in zip(rows, categories):
        out[cat] += row.response_tokens
    return dict(out)
