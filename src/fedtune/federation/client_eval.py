"""Federated evaluation in the round loop, and the in-process clients' side of it.

With ``eval.federated`` on, every client keeps ``eval.client_holdout`` of its rows out of
training (drawn from (seed, "client-holdout", client); data/partition.py ``client_holdout``):
the in-process engine and Flower nodes started with ``partition-id`` carve them from the
client's shard when the run's data is split (``setup.make_partition``, recorded in
``partition.json``), a node with its own ``data-path`` from its file. The same rows are out of
training in every mode: the centralized baseline pools the clients' remaining rows, a
local-only client trains on its remaining rows, and each of them is scored on every client's
held-out rows, so ``federated_eval`` lines of a compare's runs are comparable. (Runs with
federated evaluation on and off train on different rows; the setting cannot change on resume.)

Every ``eval.every`` rounds, the last, and round 0, ``evaluate_round`` asks the clients of
:func:`~fedtune.evaluation.federated.evaluation_clients` for their sums (``clients.evaluate``:
:class:`ClientHoldout` in-process, Flower messages on the Flower engine), combines them
(evaluation/federated.py) and logs a ``{"type": "federated_eval", ...}`` line. A client that does
not answer is listed under ``failed`` with the reason; evaluation never stops a run. In-process
clients do not drop out of evaluations (``federation.dropout`` simulates failed fits).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from fedtune.config import RunConfig
from fedtune.data.partition import client_holdout
from fedtune.evaluation.federated import Sums, client_sums, combine, evaluation_clients, tokens_by_category
from fedtune.model.lora import set_adapter
from fedtune.reporting.metrics import MetricsLog
from fedtune.reporting.progress import FEDERATED_EVALUATION, Progress
from fedtune.seeding import generator
from fedtune.types import Adapter, ClientFailure

log = logging.getLogger(__name__)

FEDERATED_EVAL = "federated_eval"  # metrics.jsonl line type


def split_rows(cfg: RunConfig, client: int, rows: Sequence) -> tuple[list, list]:
    """(rows ``client`` trains on, rows it holds out) of its ``rows``, in their order."""
    train, held = client_holdout(len(rows), cfg.eval.client_holdout, generator(cfg.seed, "client-holdout", client))
    return [rows[i] for i in train], [rows[i] for i in held]


def score(model, params, adapter: Adapter, evaluator, rows: Sequence, categories: Sequence[str], task: str,
          progress: Progress) -> Sums:
    """One client's sums: ``evaluator`` (built on its held-out ``rows``) run with ``adapter`` loaded."""
    if not rows:  # a client with fewer than two rows holds none out
        return {}
    set_adapter(params, adapter)
    result = evaluator.evaluate(model, progress)
    return client_sums(result, task, tokens_by_category(rows, categories) if task == "sft" else None)


class ClientHoldout:
    """The in-process clients' held-out rows, scored on the one shared model.

    ``rows[c]`` / ``categories[c]``: client c's encoded held-out rows and their categories;
    ``make_evaluator(rows, categories)`` builds the run's evaluator on them (setup.build_evaluator),
    once per client (a DPO evaluator keeps its reference log-probs)."""

    def __init__(self, model, params, rows: Sequence[Sequence], categories: Sequence[Sequence[str]], task: str,
                 make_evaluator: Callable, progress: Progress):
        self.model, self.params, self.rows, self.categories, self.task = model, params, rows, categories, task
        self.make_evaluator, self.progress = make_evaluator, progress
        self.evaluators: dict[int, object] = {}

    def evaluate(self, round: int, clients: Sequence[int], adapter: Adapter) -> tuple[dict[int, Sums], list[ClientFailure]]:
        scores = {}
        with self.progress.phase(FEDERATED_EVALUATION, len(clients)) as shown:
            for cid in clients:
                if cid not in self.evaluators:
                    self.evaluators[cid] = self.make_evaluator(self.rows[cid], self.categories[cid])
                scores[cid] = score(self.model, self.params, adapter, self.evaluators[cid], self.rows[cid],
                                    self.categories[cid], self.task, self.progress)
                shown.advance()
        return scores, []


def evaluate_round(cfg: RunConfig, clients, metrics: MetricsLog, progress: Progress, round: int, adapter: Adapter) -> dict:
    """Round ``round``'s federated evaluation of ``adapter``: ask the clients, combine, log."""
    asked = evaluation_clients(cfg.partition.num_clients, cfg.eval.federated_clients, cfg.seed, round)
    scores, failures = clients.evaluate(round, asked, adapter)
    result = {**combine(scores, cfg.task), "clients": sorted(scores),
              "failed": [{"client": f.client_id, "reason": f.reason} for f in failures]}
    for f in failures:
        log.warning("round %d: client %d did not evaluate: %s", round, f.client_id, f.reason)
    metrics.log({"type": FEDERATED_EVAL, "round": round, **result})
    progress.federated_evaluated(round, result)
    return result
