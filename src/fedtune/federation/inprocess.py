"""The in-process engine: a whole federation inside one Python process.

``run`` sets a run up (or reopens one to resume) and hands over to ``run_rounds``, the one
round loop, which reads top to bottom:

    sample clients -> client config -> local fits -> aggregate -> evaluate -> log -> checkpoint

A sampled client may fail to return an update; failures are logged as
``{"type": "failure", ...}`` lines. A round with fewer than ``federation.min_clients``
updates (the one "too few updates" rule, here and nowhere else):

- is *skipped* when every failure was simulated (``federation.dropout``: seeded, so a rerun
  fails the same clients and failing the run would make it impossible to finish): the global
  adapter and strategy state stay as they were, and client state written in that round is
  rolled back;
- otherwise (a real failure: a SuperNode gone, silent past ``flower.round_timeout``, or an
  undecodable reply) *fails* the run with an AggregationError and the checkpoint of the
  previous round intact: bring the nodes back and ``--resume``.

Every returned update is validated on the server (server/validate.py: names, shapes, dtype,
finite values, norm bound); a rejected one is logged as ``{"type": "rejected", ...}`` and
never merged. If validation leaves fewer than ``federation.min_clients`` updates, the run
*fails* with an AggregationError and the previous round's checkpoint intact (unlike dropout,
a rejection is a security event: skipping would let an attacker stall training unnoticed;
fix the cause, e.g. lower attack.fraction or relax privacy.norm_bound_factor, and resume).

With client-level DP (privacy.dp, privacy/dpfedavg.py) the server's private aggregate is
what the strategy sees (central), or clients noise their own updates (local); epsilon is
logged with every eval and round line, and ``privacy.target_epsilon`` ends the run, final
adapter saved, before the round that would exceed it.

With ``eval.federated`` on, each evaluation is followed by a federated one: the clients score
the adapter on their own held-out rows (``clients.evaluate``; federation/client_eval.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fedtune.client.schedule import round_lr
from fedtune.config import RunConfig, config_hash, federated_eval, to_dict
from fedtune.data.sources import LoadReport
from fedtune.errors import AggregationError
from fedtune.evaluation.base_cache import BaseEvalCache, is_noop
from fedtune.evaluation.heldout import HeldoutEvaluator
from fedtune.evaluation.samples import loss_changes, pick_samples
from fedtune.federation import baselines, client_eval, setup
from fedtune.federation.clients import Clients, LocalClients
from fedtune.federation.checkpoint import Checkpoint, save_checkpoint
from fedtune.federation.rundir import (
    METRICS_FILE, RunLock, RunResult, check_run_dir, lock_run_dir, save_final_adapter, storage_errors, write_run_dir,
)
from fedtune.federation.sharing import write_portable_adapter
from fedtune.model.lora import set_adapter
from fedtune.model.row_adapters import answer_each, stackable
from fedtune.privacy.dpfedavg import DPFedAvg, epsilon_fields
from fedtune.reporting.curves import EVAL_PLOT, plot_eval
from fedtune.reporting.metrics import MetricsLog, read_metrics
from fedtune.reporting.progress import EVALUATION, LOADING, SAMPLES, TOKENISING, Progress
from fedtune.reporting.report import write_report
from fedtune.reporting.trackers import open_trackers, require_trackers
from fedtune.seeding import generator
from fedtune.server.sampling import clients_per_round, sample_clients
from fedtune.server.validate import validate_updates
from fedtune.types import Adapter

log = logging.getLogger(__name__)


@dataclass
class Federation:
    """Everything the round loop works with, built once per run."""

    cfg: RunConfig
    run_dir: Path
    bundle: setup.ModelBundle
    clients: Clients
    strategy: object
    evaluator: HeldoutEvaluator
    metrics: MetricsLog
    progress: Progress
    stop: threading.Event
    privacy: Optional[DPFedAvg] = None
    norm_bound_factor: Optional[float] = None  # validation: reject norms above this x the round's median
    base_cache: BaseEvalCache = dataclasses.field(default_factory=lambda: BaseEvalCache(None))  # round 0 from a fresh adapter

    def schedule(self, round: int) -> list[int]:
        """Clients of ``round``: a pure function of (seed, round), so resume replays it."""
        fed = self.cfg.federation
        if fed.mode != "federated":  # baselines: the pooled client, or one client alone
            return baselines.fixed_schedule(self.cfg)
        k = clients_per_round(len(self.clients), fed.clients_per_round, fed.fraction)
        sizes = self.clients.sizes() if fed.sampling == "weighted" else None
        return sample_clients(len(self.clients), k, generator(self.cfg.seed, "sampling", round), sizes)

    def evaluate(self, adapter: Adapter, final: bool = False) -> dict:
        """The held-out evaluation of ``adapter``. A fresh adapter adds nothing: the base model's
        evaluation, computed once; the ``final`` round's is stored too, for a compare or
        ``fedtune eval`` of this run to read back (base_cache.py)."""
        set_adapter(self.bundle.params, adapter)
        if is_noop(adapter) or final:
            return self.base_cache.evaluate(self.bundle, self.evaluator, self._evaluate, self.progress, adapter=adapter)
        return self._evaluate()

    def _evaluate(self, per_example: bool = False) -> dict:
        return self.evaluator.evaluate(self.bundle.model, self.progress, EVALUATION, per_example=per_example)

    def checkpoint(self, round: int, adapter: Adapter, state: dict) -> None:
        ckpt = Checkpoint(round, adapter, state, self.metrics.lines, config_hash(self.cfg))
        save_checkpoint(self.run_dir, ckpt, self.bundle.peft_config, self.cfg.seed, self.cfg.output.keep_checkpoints)


def run_rounds(fed: Federation, start_round: int, global_adapter: Adapter, state: dict) -> tuple[Adapter, int, Optional[dict]]:
    """Rounds ``start_round + 1 .. cfg.federation.rounds`` (fewer when the privacy budget
    runs out first); returns (adapter, last round, last eval)."""
    cfg, last_eval = fed.cfg, None
    total = cfg.federation.rounds
    last = fed.privacy.last_round(total) if fed.privacy else total
    for rnd in range(start_round + 1, last + 1):
        started = time.perf_counter()
        clients = fed.schedule(rnd)
        fed.progress.round_started(rnd, clients)
        client_config = fed.strategy.client_config(rnd, state)
        lr = round_lr(rnd, total, cfg.train.lr, cfg.train.lr_schedule, cfg.train.min_lr)

        updates, failures = fed.clients.fit(rnd, clients, global_adapter, client_config, lr)
        accepted, rejected, norms = validate_updates(global_adapter, updates, fed.norm_bound_factor)
        merged = len(accepted)  # clients whose updates the round may merge
        if cfg.privacy.secure_aggregation:  # SecAgg+: one pre-summed update (no norm bound: config refuses it)
            from fedtune.federation.flower import secagg  # only a Flower run gets here: the in-process engine does not import flwr

            updates = secagg.members(updates[0])  # the clients in the sum (fit lines, the min_clients counts)
            merged = len(updates) if accepted else 0
        log_fits(fed.metrics, rnd, updates, norms, failures, rejected)

        skipped = None
        if len(updates) < cfg.federation.min_clients:
            skipped = f"{len(updates)} of {len(clients)} clients returned, fewer than federation.min_clients={cfg.federation.min_clients}"
            if not all(f.simulated for f in failures):  # real failures: fail the run, resumable (module doc)
                raise AggregationError(
                    f"round {rnd}: {skipped} (reasons in metrics.jsonl); the round was not aggregated and the "
                    f"checkpoint of round {rnd - 1} is intact: bring the clients back and resume the run"
                )
            fed.clients.rollback(rnd)
            log.warning("round %d skipped: %s", rnd, skipped)
        elif merged < cfg.federation.min_clients:
            raise AggregationError(
                f"round {rnd}: validation rejected {len(rejected)} of {len(updates)} updates (clients "
                f"{[r.client_id for r in rejected]}; reasons in metrics.jsonl), fewer than federation.min_clients="
                f"{cfg.federation.min_clients} remain; the round was not merged and the checkpoint of round {rnd - 1} is intact"
            )
        else:
            if fed.privacy is not None and fed.privacy.mode == "central":  # the strategy sees only the private release
                accepted = [fed.privacy.release(accepted, len(clients), rnd)]
            global_adapter, state = fed.strategy.aggregate(global_adapter, accepted, state)

        privacy = epsilon_fields(fed.privacy, rnd)
        if evaluates(cfg, rnd, last):
            last_eval = fed.evaluate(global_adapter, final=rnd == last)
            fed.metrics.log({"type": "eval", "round": rnd, **last_eval, **privacy})
            fed.progress.evaluated(rnd, {**last_eval, **privacy})
            if federated_eval(cfg):  # the clients score it on their own held-out rows (client_eval.py)
                client_eval.evaluate_round(cfg, fed.clients, fed.metrics, fed.progress, rnd, global_adapter)

        seconds = time.perf_counter() - started
        fed.metrics.log({"type": "round", "round": rnd, "clients": clients, "failed": [f.client_id for f in failures],
                         "rejected": [r.client_id for r in rejected], "skipped": skipped, "lr": lr, "seconds": seconds, **privacy})
        fed.checkpoint(rnd, global_adapter, state)
        fed.progress.round_finished(rnd, seconds)
        if fed.stop.is_set() and rnd < last:  # Ctrl-C: the caller says "stopped after round rnd"
            return global_adapter, rnd, last_eval
    if last < total:
        fed.progress.message(
            f"privacy budget: round {last + 1} would take epsilon to {fed.privacy.epsilon(last + 1):.3g} > "
            f"privacy.target_epsilon={fed.privacy.target:g} (delta={fed.privacy.delta:g}); stopped after round {last}"
        )
    return global_adapter, max(last, start_round), last_eval


def evaluates(cfg: RunConfig, rnd: int, last: int) -> bool:
    """Whether round ``rnd`` ends with a held-out evaluation (every eval.every rounds, and the last)."""
    return rnd % cfg.eval.every == 0 or rnd == last


def log_fits(metrics: MetricsLog, rnd: int, updates: list, norms: dict, failures: list, rejected: list) -> None:
    """A ``fit`` line per returned update (with its L2 norm), a ``failure`` line per client
    that returned none, a ``rejected`` line per update that validation refused."""
    for u in updates:
        metrics.log({"type": "fit", "round": rnd, "client": u.client_id, "examples": u.num_examples,
                     "norm": norms.get(u.client_id), **u.metrics})
    for f in failures:
        metrics.log({"type": "failure", "round": rnd, "client": f.client_id, "reason": f.reason})
        log.info("round %d: client %d returned no update (%s)", rnd, f.client_id, f.reason)
    for r in rejected:
        metrics.log({"type": "rejected", "round": rnd, "client": r.client_id, "reason": r.reason})
        log.warning("round %d: update of client %d rejected: %s", rnd, r.client_id, r.reason)


def run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    from_round: Optional[int] = None,
    progress: Optional[Progress] = None,
    stop: Optional[threading.Event] = None,
    data: Optional[Callable[[RunConfig], tuple[list, LoadReport, setup.Partition]]] = None,
    connect: Optional[Callable[..., Clients]] = None,
    lock: Optional[RunLock] = None,
) -> RunResult:
    """Run (or, with ``resume``, continue) the federation that ``cfg`` describes; ``from_round``
    resumes from that kept checkpoint instead of the newest (later rounds are discarded).

    The run directory is locked (rundir.py) from the first check to the return; a caller that
    already holds the lock (the Flower simulation) passes it as ``lock``. Another engine reuses
    this setup and loop through two hooks: ``data(cfg)`` gives the server's (examples, load
    report, partition) (default: read ``data.path`` and split it), and ``connect(cfg, bundle,
    shards, progress, metrics)`` gives the object whose ``fit(...)`` reaches the clients
    (default: :class:`LocalClients`, every fit in this process).
    """
    run_dir = Path(cfg.output.dir)
    baselines.check_mode(cfg)
    require_trackers(cfg.output.trackers)  # a missing tracker package: one line, before anything is loaded
    with storage_errors(run_dir), (contextlib.nullcontext(lock) if lock else lock_run_dir(run_dir)), contextlib.ExitStack() as closing:
        ckpt = check_run_dir(cfg, run_dir, resume or from_round is not None, from_round)  # before any file is written
        return _run_locked(cfg, run_dir, ckpt, progress or Progress(), stop or threading.Event(), data, connect, closing)


def _run_locked(cfg: RunConfig, run_dir: Path, ckpt: Optional[Checkpoint], progress: Progress, stop: threading.Event,
                data, connect, closing: contextlib.ExitStack) -> RunResult:
    """``run`` once the directory is locked and checked: set up, start or reopen, loop, finish."""
    examples, report, partition = (data or setup.load_and_split)(cfg)
    categories = [e.category for e in examples]
    progress.message(f"data: {len(examples)} rows from {report.source}; {len(partition.shards)} clients, "
                     f"{len(partition.holdout)} held out ({partition.method} split)")
    with progress.phase(LOADING):
        bundle = setup.build_model(cfg, training=True)
    with progress.phase(TOKENISING):
        encoded = setup.encode_examples(bundle.tokenizer, examples, cfg.data.template, cfg.data.max_length)
    if ckpt is not None:  # the data must split as before; checked before anything is rewound
        setup.check_partition(run_dir, partition, categories)
    write_run_dir(cfg, run_dir, ckpt)
    setup.write_partition(run_dir, partition, categories, check=ckpt is not None)
    metrics = closing.enter_context(MetricsLog(run_dir / METRICS_FILE, open_trackers(
        cfg.output.trackers, run_dir, config=to_dict(cfg), start_round=ckpt.round if ckpt else 0,
        history=list(read_metrics(run_dir / METRICS_FILE))[:ckpt.metrics_lines] if ckpt and cfg.output.trackers else [],
    )))  # every logged record also goes to the output.trackers, closed when the run returns
    shards = setup.client_shards(cfg, bundle.tokenizer, examples, encoded, partition.shards)
    if connect is None:  # in-process: the clients' own held-out rows are here too (federated evaluation)
        connect = functools.partial(local_clients, holdout=local_holdout(cfg, bundle, encoded, categories, partition, progress))
    fed = Federation(
        cfg=cfg,
        run_dir=run_dir,
        bundle=bundle,
        clients=connect(cfg, bundle, shards, progress, metrics),
        strategy=setup.build_strategy(cfg),
        evaluator=setup.build_evaluator(cfg, bundle, [encoded[i] for i in partition.holdout], [categories[i] for i in partition.holdout]),
        metrics=metrics,
        progress=progress,
        stop=stop,
        privacy=setup.build_privacy(cfg),
        norm_bound_factor=setup.norm_bound_factor(cfg),
        base_cache=setup.build_base_cache(cfg),
    )
    if cfg.federation.mode == "centralized":  # one client with all training shards, the federated step budget
        federated = dataclasses.replace(fed, cfg=baselines.with_mode(cfg, "federated", run_dir))
        fed.clients = baselines.pooled_clients(federated.schedule, fed.clients, cfg.federation.rounds)
    prompts = setup.sample_prompts(cfg, examples, partition.holdout)  # none configured: picked after training
    result = RunResult(run_dir, 0, cfg.federation.rounds, fed.privacy.last_round(cfg.federation.rounds) if fed.privacy else None)

    if ckpt is None:  # a new run: log the data, evaluate and sample the starting point, checkpoint round 0
        empty = sum(1 for e in encoded if e.response_tokens == 0)
        fed.metrics.log({"type": "data", "round": 0, "source": report.source, "rows": report.rows,
                         "examples": len(examples), "skipped": report.skipped, "skipped_reasons": list(report.skipped_reasons),
                         "no_response_tokens": empty, "max_length": cfg.data.max_length})
        global_adapter, state, start = bundle.initial_adapter, fed.strategy.init_state(bundle.initial_adapter), 0
        result.initial_eval = fed.evaluate(global_adapter)
        fed.metrics.log({"type": "eval", "round": 0, **result.initial_eval, **epsilon_fields(fed.privacy, 0)})
        progress.evaluated(0, result.initial_eval)
        if federated_eval(cfg):
            client_eval.evaluate_round(cfg, fed.clients, fed.metrics, progress, 0, global_adapter)
        if prompts:
            result.samples_before = answer(fed, prompts, global_adapter)
            fed.metrics.log({"type": "samples", "round": 0, "items": result.samples_before})
        fed.checkpoint(0, global_adapter, state)
        fed.clients.rollback(1)  # client state a former run in this folder left (on a node's disk) is not this run's
        last_eval = None
    else:
        fed.metrics.truncate(ckpt.metrics_lines)
        global_adapter, state, start = ckpt.adapter, ckpt.strategy_state, ckpt.round
        fed.clients.rollback(start + 1)  # client state written after the checkpoint never happened
        earlier = list(read_metrics(fed.metrics.path))
        result.initial_eval = next((r for r in earlier if r["type"] == "eval" and r["round"] == 0), None)
        last_eval = next((r for r in reversed(earlier) if r["type"] == "eval"), None)
        recorded = next((r["items"] for r in earlier if r["type"] == "samples" and r["round"] == 0), [])
        same = [(s["prompt"], s["input"]) for s in recorded] == [(p["prompt"], p["input"]) for p in prompts]
        # eval.* may change on resume: prompts not answered at round 0 are answered now with the starting adapter
        result.samples_before = recorded if same else answer(fed, prompts, bundle.initial_adapter)
        progress.message(f"resuming {run_dir} after round {start} of {cfg.federation.rounds}")

    last = cfg.federation.rounds if result.last_round is None else result.last_round
    remaining = sum(fed.clients.steps(c, r) for r in range(start + 1, last + 1) for c in fed.schedule(r))
    # the ETA counts the evaluations and the final sample answers still to come, timed by those done
    pending = {EVALUATION: sum(evaluates(cfg, r, last) for r in range(start + 1, last + 1)),
               SAMPLES: 1 if prompts else int(cfg.eval.num_samples > 0) * (1 if stackable(bundle.model) else 2)}
    # configured: the after answers; picked: both, at once where the adapters stack (model/row_adapters.py)
    progress.run_started(cfg.federation.rounds, start, remaining, pending)
    try:
        global_adapter, result.rounds_done, result.final_eval = run_rounds(fed, start, global_adapter, state)
        if result.finished and not prompts:  # held-out rows of the categories whose loss fell most, answered before/after
            prompts = pick_samples(examples, partition.holdout, cfg.eval.num_samples,
                                   loss_changes(result.initial_eval, result.final_eval or last_eval))
            result.samples_before, result.samples_after = answer_both(fed, prompts, bundle.initial_adapter, global_adapter)
            fed.metrics.log({"type": "samples", "round": 0, "items": result.samples_before})
        elif result.finished:
            result.samples_after = answer(fed, prompts, global_adapter)
    finally:
        progress.run_finished()
    if result.final_eval is None and last_eval is not None:  # resumed with no round left: the last one's eval
        result.final_eval = {k: v for k, v in last_eval.items() if k not in ("type", "round")}
    plot_eval(fed.metrics.path, run_dir / EVAL_PLOT)
    if result.finished:
        fed.metrics.log({"type": "samples", "round": result.rounds_done, "items": result.samples_after})
        portable = functools.partial(write_portable_adapter, cfg=cfg, run_dir=run_dir, tokenizer=bundle.tokenizer, base_path=bundle.base_path)
        save_final_adapter(run_dir, global_adapter, bundle.peft_config, portable)  # last: adapter/ means finished
    if cfg.output.report:
        result.report = write_report(run_dir)
    return result


def local_clients(cfg: RunConfig, bundle: setup.ModelBundle, shards: list, progress: Progress, metrics: MetricsLog,
                  holdout: Optional[client_eval.ClientHoldout] = None) -> LocalClients:
    """The in-process transport: every client's fit runs here, on the one shared model."""
    return setup.build_clients(cfg, setup.build_trainer(cfg, bundle), shards, progress, Path(cfg.output.dir), holdout)


def local_holdout(cfg: RunConfig, bundle: setup.ModelBundle, encoded: list, categories: list[str], partition: setup.Partition,
                  progress: Progress) -> Optional[client_eval.ClientHoldout]:
    """The clients' own held-out rows (``partition.client_holdout``) for federated evaluation, or None when it is off."""
    if not federated_eval(cfg):
        return None
    held = partition.client_holdout
    return client_eval.ClientHoldout(
        bundle.model, bundle.params, [[encoded[i] for i in ids] for ids in held], [[categories[i] for i in ids] for ids in held],
        cfg.task, lambda rows, cats: setup.build_evaluator(cfg, bundle, rows, cats), progress,
    )


def answer(fed: Federation, prompts: list[dict], adapter: Adapter) -> list[dict]:
    """Greedy answers to the sample prompts with ``adapter`` loaded."""
    if not prompts:
        return []
    set_adapter(fed.bundle.params, adapter)
    cache = fed.base_cache if is_noop(adapter) else BaseEvalCache(None)  # a fresh adapter answers as the base model
    answers = cache.answer_prompts(fed.bundle, [p["prompt"] for p in prompts], [p["input"] for p in prompts], template=fed.cfg.data.template,
                                   max_new_tokens=fed.cfg.eval.max_new_tokens, batch_size=fed.cfg.eval.generation_batch_size,
                                   progress=fed.progress, phase=SAMPLES)
    return [{**p, "answer": a} for p, a in zip(prompts, answers)]


def answer_both(fed: Federation, prompts: list[dict], before: Adapter, after: Adapter) -> tuple[list[dict], list[dict]]:
    """Greedy answers to the sample prompts with the starting and the final adapter, in shared
    batches (model/row_adapters.py: half the decoding steps of answering one after the other)."""
    if not prompts:
        return [], []
    both = answer_each(fed.bundle.model, fed.bundle.params, [before, after], fed.bundle.tokenizer, [p["prompt"] for p in prompts],
                       inputs=[p["input"] for p in prompts], template=fed.cfg.data.template, max_new_tokens=fed.cfg.eval.max_new_tokens,
                       batch_size=fed.cfg.eval.generation_batch_size, progress=fed.progress, phase=SAMPLES)
    return tuple([{**p, "answer": a} for p, a in zip(prompts, answers)] for answers in both)
