"""Secure aggregation on the Flower engine (``privacy.secure_aggregation=true``): Flower's SecAgg+.

The server learns only the example-weighted mean of a round's deltas, never one client's.
Flower's library does the protocol and the cryptography (``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the nodes); this module only adapts fedtune's records to it:

- **Server** (:func:`secure_fit`): the workflow's four stages (setup -> share keys -> collect
  masked vectors -> unmask) are driven one by one with fedtune's TRAIN content as the
  "fit instructions" of the collect stage. The workflow was written for the legacy Strategy
  API: it asks ``context.strategy.configure_fit`` for (node, FitIns) pairs and hands the
  unmasked result to ``context.strategy.aggregate_fit``; :class:`_Rendezvous` stands in for
  that strategy (it names the sampled nodes and receives the result), and after the setup
  stage the workflow's per-node instructions are replaced by fedtune's own TRAIN records. Its
  ``grid.send_and_receive`` (a 3 s poll) goes through :class:`_Grid`, fedtune's exchange, which
  also remembers why a node dropped out.
- **Node** (:func:`mod`): every ClientApp carries this mod. A TRAIN message without SecAgg+
  configs passes through; with them, ``secaggplus_mod`` runs the stage, and in the collect
  stage fedtune's train handler runs and its reply is recast as the FitRes layout the mod masks
  (:func:`to_fitres`): the delta as float64 arrays in sorted key order, the example count n.

The weighting and quantisation are SecAgg+'s, with values chosen here for LoRA deltas. A
client with n examples sends, masked, ``[q(n/W), Q((n/W) * delta)]`` with W the largest
example count among the round's clients (:func:`max_weight`); ``Q(x)`` clips x to [-C, C]
(``privacy.secagg_clip``) and maps it stochastically onto the integers 0..T; the masks and the
sum live modulo M = 2**32. The server unmasks the sum and divides by the summed q(n/W): the
example-weighted mean, i.e. FedAvg. T (:func:`quantization_range`) is the largest power of two
with K*T < M for the round's K clients (so the sum cannot wrap), at most 2**30 (Flower rounds
to int32). The error per value of the mean is below :func:`tolerance`: K steps of 2C/T over
sum(n/W) >= 1; for K=3, C=1 that is 5.6e-9 (LoRA deltas are ~1e-4..1e-1). Values beyond C are
clipped, which biases the mean: each client reports how many it clipped (``secagg_clipped``).

The round loop receives one pre-summed update (client id :data:`SUM_ID`) whose metrics carry
the clients that made it into the sum (:func:`members`, their own fit metrics: in the clear,
as without SecAgg+); the clients that dropped out at any stage are failures.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from fedtune.errors import AggregationError
from fedtune.federation.flower import records
from fedtune.types import Adapter, ClientFailure, ClientUpdate

log = logging.getLogger(__name__)

MODULUS = 2**32  # masks and sums live modulo M (Flower's largest)
MAX_RANGE = 2**30  # Flower quantises into int32
SUM_ID = -2  # client id of the pre-summed update (DP's release is -1)
MEMBERS = "secagg_members"  # the summed update's metrics: the clients in the sum (their ClientUpdates, no delta)
CLIPPED = "secagg_clipped"  # a client's metric: values it clipped to [-C, C]
STAGES = ("setup", "share keys", "collect masked vectors", "unmask")


@dataclass(frozen=True)
class SecAgg:
    """SecAgg+ settings: C (per-value clip) and the share of peers that rebuilds a mask."""

    clip: float = 1.0
    threshold: float = 0.67


def settings(cfg) -> Optional[SecAgg]:
    """The run's SecAgg+ settings, None when secure aggregation is off."""
    p = cfg.privacy
    return SecAgg(p.secagg_clip, p.secagg_threshold) if p.secure_aggregation else None


# ----------------------------------------------------------------------------- pure parts


def quantization_range(num_clients: int) -> int:
    """T: the largest power of two with ``num_clients * T < MODULUS``, at most 2**30."""
    if num_clients < 1:
        raise ValueError("secure aggregation needs at least one client")
    return min(MAX_RANGE, 2 ** (32 - math.ceil(math.log2(num_clients + 1))))


def max_weight(sizes: Sequence[int]) -> float:
    """W: the largest example count of the round (so every weight n/W is in (0, 1])."""
    return float(max(max(sizes), 1))


def tolerance(sizes: Sequence[int], clip: float) -> float:
    """Bound on the absolute error per value of the unmasked mean (values within [-C, C]):
    each client's stochastic rounding moves its weighted value by less than one step 2C/T,
    and the sum is divided by sum(n/W)."""
    steps = len(sizes) * 2 * clip / quantization_range(len(sizes))
    return steps / (sum(sizes) / max_weight(sizes))


def flat(adapter: Adapter) -> list[np.ndarray]:
    """An adapter as float64 arrays in sorted key order (float64: the quantiser adds C before
    scaling, which float32 would round to 2**-23 C)."""
    return [adapter[k].detach().cpu().double().numpy() for k in sorted(adapter)]


def unflat(arrays: Sequence[np.ndarray], like: Adapter) -> Adapter:
    """:func:`flat`'s inverse, float32, with the keys and shapes of ``like`` (AggregationError otherwise)."""
    keys = sorted(like)
    if len(arrays) != len(keys):
        raise AggregationError(f"the secure sum has {len(arrays)} tensors, the global adapter {len(keys)}")
    out = {}
    for k, a in zip(keys, arrays):
        if tuple(a.shape) != tuple(like[k].shape):
            raise AggregationError(f"the secure sum's tensor {k} has shape {tuple(a.shape)}, expected {tuple(like[k].shape)}")
        out[k] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return {k: out[k] for k in like}


def count_clipped(arrays: Sequence[np.ndarray], weight: float, clip: float) -> int:
    """Values of ``weight * arrays`` outside [-clip, clip] (the quantiser clips them)."""
    return int(sum(int(np.count_nonzero(np.abs(a) * weight > clip)) for a in arrays))


def members(update: ClientUpdate) -> list[ClientUpdate]:
    """The clients in a pre-summed update (each with its example count and fit metrics, no delta)."""
    return list(update.metrics[MEMBERS])


# ----------------------------------------------------------------------------- node side


def mod(message: Message, context: Context, call_next) -> Message:
    """The ClientApp mod: SecAgg+ for TRAIN messages that carry its configs; others pass through."""
    if message.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in message.content.config_records:
        return call_next(message, context)
    return secaggplus_mod(message, context, lambda m, c: to_fitres(call_next(m, c), m, c))


def to_fitres(reply: Message, message: Message, context: Context) -> Message:
    """fedtune's update reply as the FitRes layout ``secaggplus_mod`` masks; the fit metrics
    (and client id) stay in the clear, the delta is masked and then cleared by the mod."""
    content = reply.content
    client = content.config_records[records.UPDATE][records.CLIENT]
    update = records.read_update(content, client)
    state = context.state.config_records[RECORD_KEY_STATE]
    w, clip = float(state["max_weight"]), float(state["clipping_range"])
    if update.num_examples > w:  # its weight n/W would exceed 1 and could wrap the sum: drop out instead
        raise ValueError(f"client {client} has {update.num_examples} examples, more than the {w:g} the server announced")
    arrays = flat(update.delta)
    metrics = {k: v for k, v in update.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update({records.CLIENT: client, CLIPPED: count_clipped(arrays, update.num_examples / w, clip)})
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), update.num_examples, metrics)
    return Message(compat.fitres_to_recorddict(fitres, False), reply_to=message)


# ----------------------------------------------------------------------------- server side


class _Rendezvous:
    """The legacy Strategy the workflow talks to: names the round's nodes, receives the result."""

    def __init__(self, grid, nodes: Sequence[int]):
        self.proxies = [GridClientProxy(n, grid, 0) for n in nodes]
        self.results: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(p, FitIns(Parameters([], ""), {})) for p in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}


class _Grid:
    """The workflow's ``send_and_receive`` through fedtune's exchange; remembers each node's
    last failure (an error reply, or no reply) with the stage it happened in."""

    def __init__(self, grid, exchange, no_reply, stage: list):
        self.grid, self.exchange, self.no_reply, self.stage = grid, exchange, no_reply, stage
        self.failed: dict[int, str] = {}

    def send_and_receive(self, messages, timeout=None):
        by_node = {m.metadata.dst_node_id: m for m in messages}
        replies = self.exchange(self.grid, by_node, timeout)
        for node in by_node:
            reply = replies.get(node)
            if reply is None or reply.has_error():
                self.failed[node] = f"{self.no_reply(reply, timeout)} in the SecAgg+ {self.stage[0]} stage"
        return list(replies.values())


def secure_fit(clients, secagg: SecAgg, round: int, ids: Sequence[int], global_adapter: Adapter, client_config: dict,
               lr: float) -> tuple[list[ClientUpdate], list[ClientFailure]]:
    """One round's fits through SecAgg+ (``clients`` is the FlowerClients): ([the pre-summed
    update], failures). AggregationError when the protocol halts (too many dropped out); the
    round loop decides whether the clients in the sum are enough (federation.min_clients)."""
    from fedtune.federation.flower.transport import exchange, no_reply  # transport imports this module

    clients.connect()
    clients.discover(clients.round_timeout)
    failures = [ClientFailure(c, "no SuperNode holding this client is connected") for c in ids if c not in clients.node_of]
    present = [c for c in ids if c in clients.node_of]
    client_of = {clients.node_of[c]: c for c in present}
    if len(present) < 2:
        raise AggregationError(f"round {round}: SecAgg+ needs at least 2 connected clients, {len(present)} of {len(ids)} are")
    sizes = [clients.size[c] for c in present]
    workflow = SecAggPlusWorkflow(
        1.0, secagg.threshold, max_weight=max_weight(sizes), clipping_range=float(secagg.clip),
        quantization_range=quantization_range(len(present)), modulus_range=MODULUS, timeout=clients.round_timeout,
    )
    rendezvous, stage = _Rendezvous(clients.grid, list(client_of)), [STAGES[0]]
    grid = _Grid(clients.grid, exchange, no_reply, stage)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: round}), MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(0, 0, {}, state, {}), strategy=rendezvous)
    for c in present:
        clients.progress.client_started(round, c, clients.steps(c, round))

    ws, contributed = WorkflowState(), set()
    steps = (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage, workflow.unmask_stage)
    for name, step in zip(STAGES, steps):
        stage[0] = name
        if not step(grid, context, ws):
            break
        if name == "setup":  # the collect stage sends these, with the forwarded key shares, to each node
            ws.nid_to_fitins = {n: records.train_content(global_adapter, c, round, lr, client_config) for n, c in client_of.items()}
        if name == "collect masked vectors":
            contributed = set(ws.active_node_ids)
    else:
        stage[0] = "done"
    failures += [ClientFailure(c, grid.failed.get(n, f"dropped out in the SecAgg+ {stage[0]} stage"))
                 for n, c in client_of.items() if n not in contributed]
    if stage[0] != "done" or not rendezvous.results:
        raise AggregationError(
            f"round {round}: SecAgg+ halted in the {stage[0]} stage: {len(grid.failed)} of {len(present)} clients dropped out, "
            f"more than privacy.secagg_threshold={secagg.threshold:g} allows (reasons in metrics.jsonl); the round was not "
            "aggregated and the last checkpoint is intact: bring the SuperNodes back and resume the run"
        )
    return [summed(clients, round, rendezvous.results, client_of, global_adapter)], failures


def summed(clients, round: int, results: list, client_of: dict, global_adapter: Adapter) -> ClientUpdate:
    """The pre-summed update from the workflow's results (each holds the unmasked mean)."""
    inside = []
    for proxy, fitres in results:
        metrics = {k: v for k, v in fitres.metrics.items() if k != records.CLIENT}
        inside.append(ClientUpdate(client_of[proxy.node_id], int(fitres.num_examples), {}, metrics))
    inside.sort(key=lambda u: u.client_id)  # too few of them for federation.min_clients: the round loop's call
    for u in inside:
        clients.finished(round, u)
    mean = unflat(parameters_to_ndarrays(results[0][1].parameters), global_adapter)
    return ClientUpdate(SUM_ID, sum(u.num_examples for u in inside), mean, {MEMBERS: inside})
