"""How the fedtune ServerApp reaches its clients: Flower Messages through the Grid.

:class:`FlowerClients` stands where the in-process engine has
:class:`~fedtune.federation.clients.LocalClients`: the round loop calls the same
``fit(round, clients, global_adapter, client_config, lr) -> (updates, failures)`` and cannot
tell them apart. Clients are fedtune client ids; each SuperNode says which one it holds when
first queried (its ``--node-config``; in simulation, its partition id).

A transport moves tensors and reports failures; it decides nothing. A client fails (and is
returned as a :class:`ClientFailure` with the reason, which the round loop logs to
``metrics.jsonl``) when its node is not connected, errors or disconnects (the SuperLink
answers for a node whose heartbeat stops), does not reply within ``round_timeout``, or sends
a reply that does not decode as an update. Checking updates against the global adapter, and
what a round with too few updates means, are the round loop's (federation/inprocess.py).

Client state lives on the nodes (federation/flower/node_state.py): ``rollback(round)`` is
recorded here and travels with every TRAIN message of this ServerApp session, so each node
drops the versions the rollbacks made stale before its next fit.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Optional, Sequence

from flwr.app import Message, MessageType

from fedtune.errors import FederationError
from fedtune.federation.compression import Compression
from fedtune.federation.flower import records, secagg
from fedtune.reporting.metrics import MetricsLog
from fedtune.reporting.progress import Progress
from fedtune.types import Adapter, ClientFailure, ClientUpdate

log = logging.getLogger(__name__)

NODES = "nodes"  # metrics.jsonl line type
POLL_SECONDS = 0.25  # how often replies are pulled (Flower's send_and_receive waits 3 s between pulls)


class FlowerClients:
    """The clients of a Flower federation, seen from the ServerApp."""

    def __init__(
        self,
        grid,
        *,
        num_clients: int,
        min_clients: int,
        progress: Progress,
        metrics: MetricsLog,
        connect_timeout: float,
        round_timeout: Optional[float] = None,
        compression: Compression = Compression(),
        secure=None,
    ):
        self.compression = compression
        self.secure = secure  # secagg.SecAgg: fit returns one pre-summed update (federation/flower/secagg.py)
        self.grid, self.num_clients, self.min_clients = grid, num_clients, min_clients
        self.progress, self.metrics = progress, metrics
        self.connect_timeout, self.round_timeout = connect_timeout, round_timeout
        self.node_of: dict[int, int] = {}  # client id -> Flower node id
        self.size: dict[int, int] = {}  # client id -> training examples
        self.step_count: dict[int, int] = {}  # client id -> optimizer steps per round
        self.asked: set[int] = set()  # node ids already queried
        self.connected = False
        self.session = uuid.uuid4().hex  # this ServerApp's rollbacks, as the nodes see them (node_state.py)
        self.rollbacks: list[int] = []

    # ------------------------------------------------------------------ the Clients protocol

    def __len__(self) -> int:
        return self.num_clients

    def sizes(self) -> list[int]:
        """Examples per client; a client that never reported counts as the mean of the others."""
        self.connect()
        mean = round(sum(self.size.values()) / len(self.size)) if self.size else 1
        return [self.size.get(c, mean) for c in range(self.num_clients)]

    def steps(self, client: int, round: int) -> int:
        self.connect()
        return self.step_count.get(client, 0)

    def decode(self, payload: Adapter, global_adapter: Adapter) -> Adapter:
        """The delta in a (compressed) upload; ReplyError when the payload does not decode."""
        if self.compression.method == "none":
            return payload
        try:
            return self.compression.decode(payload, global_adapter)
        except (KeyError, RuntimeError, IndexError) as err:
            raise records.ReplyError(f"the {self.compression.method} payload does not decode ({type(err).__name__}: {err})") from None

    def rollback(self, round: int) -> None:
        """Tell every node, with its next TRAIN message, to forget client state of ``round`` and later."""
        self.rollbacks.append(round)

    def fit(
        self, round: int, clients: Sequence[int], global_adapter: Adapter, client_config: dict, lr: float
    ) -> tuple[list[ClientUpdate], list[ClientFailure]]:
        """Send the global adapter to ``clients``; return their decoded updates in client
        order, and the clients that failed with the reason (with SecAgg+: one pre-summed update)."""
        if self.secure is not None:
            return secagg.secure_fit(self, self.secure, round, clients, global_adapter, client_config, lr)
        self.connect()
        self.discover(self.round_timeout)  # nodes that (re)joined since the last round
        messages, failures = {}, []
        for cid in clients:
            if cid not in self.node_of:
                failures.append(ClientFailure(cid, "no SuperNode holding this client is connected"))
                continue
            content = records.train_content(global_adapter, cid, round, lr, client_config, (self.session, self.rollbacks))
            messages[cid] = Message(content, dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN, group_id=str(round))
            self.progress.client_started(round, cid, self.steps(cid, round))

        updates = []
        replies = exchange(self.grid, messages, self.round_timeout)
        for cid in messages:
            reply = replies.get(cid)
            if reply is None or reply.has_error():
                failures.append(ClientFailure(cid, no_reply(reply, self.round_timeout)))
                continue
            try:
                update = records.read_update(reply.content, cid)
                update.delta = self.decode(update.delta, global_adapter)
            except records.ReplyError as err:
                failures.append(ClientFailure(cid, f"reply does not decode: {err}"))
                continue
            self.finished(round, update)
            updates.append(update)
        return updates, failures  # updates in client order (``clients`` is sorted): the in-process sums, the same floats

    def evaluate(self, round: int, clients: Sequence[int], adapter: Adapter) -> tuple[dict[int, dict], list[ClientFailure]]:
        """Federated evaluation: send ``adapter`` to ``clients``; return ({client: sums} of those
        that scored it on their own held-out rows, failures with the reason, as ``fit`` reports them).
        A failed evaluation never fails the round."""
        self.connect()
        self.discover(self.round_timeout)
        messages, failures = {}, []
        for cid in clients:
            if cid not in self.node_of:
                failures.append(ClientFailure(cid, "no SuperNode holding this client is connected"))
                continue
            content = records.evaluate_content(adapter, cid, round)
            messages[cid] = Message(content, dst_node_id=self.node_of[cid], message_type=MessageType.EVALUATE, group_id=str(round))
        scores = {}
        replies = exchange(self.grid, messages, self.round_timeout)
        for cid in messages:
            reply = replies.get(cid)
            if reply is None or reply.has_error():
                failures.append(ClientFailure(cid, no_reply(reply, self.round_timeout)))
                continue
            try:
                scores[cid] = records.read_score(reply.content, cid)
            except records.ReplyError as err:
                failures.append(ClientFailure(cid, f"evaluation rejected: {err}"))
        return scores, failures

    # ------------------------------------------------------------------ which node holds which client

    def connect(self) -> None:
        """Once, when first needed (after the server's setup and initial evaluation): query
        SuperNodes until every client has reported or ``connect_timeout`` passes; at least
        ``min_clients`` must have reported by then."""
        if self.connected:
            return
        self.progress.message(f"waiting for {self.num_clients} clients to connect")
        deadline = time.monotonic() + self.connect_timeout
        while len(self.node_of) < self.num_clients and time.monotonic() < deadline:
            self.discover(max(1.0, deadline - time.monotonic()))
            if len(self.node_of) < self.num_clients:
                time.sleep(0.5)
        missing = sorted(set(range(self.num_clients)) - set(self.node_of))
        if len(self.node_of) < self.min_clients:
            raise FederationError(
                f"{len(self.node_of)} of {self.num_clients} clients connected within flower.connect_timeout="
                f"{self.connect_timeout:g}s (federation.min_clients={self.min_clients}); start the SuperNodes "
                "(each with --node-config 'data-path=\"...\" client-id=N') or raise the timeout"
            )
        self.metrics.log({"type": NODES, "round": 0, "clients": {str(c): n for c, n in sorted(self.size.items())},
                          "missing": missing})
        if missing:
            log.warning("starting without clients %s: they did not connect in %gs", missing, self.connect_timeout)
        self.connected = True

    def discover(self, timeout: Optional[float]) -> None:
        """Ask nodes not yet asked which client they hold (waiting at most ``timeout`` seconds)."""
        new = [n for n in self.grid.get_node_ids() if n not in self.asked]
        if not new:
            return
        messages = {n: Message(records.query_content(), dst_node_id=n, message_type=MessageType.QUERY) for n in new}
        claims: dict[int, int] = {}
        for node, reply in exchange(self.grid, messages, timeout).items():
            self.asked.add(node)
            if reply.has_error():
                log.warning("SuperNode %s could not say which client it holds: %s", node, reply.error.reason)
                continue
            try:
                cid, n, steps = records.read_node(reply.content)
            except records.ReplyError as err:
                log.warning("SuperNode %s: %s", node, err)
                continue
            self.claim(node, cid, n, steps, claims)

    def claim(self, node: int, cid: int, num_examples: int, steps: int, claims: dict[int, int]) -> None:
        if cid >= self.num_clients:
            raise FederationError(
                f"SuperNode {node} holds client {cid}, but partition.num_clients={self.num_clients}; "
                "number the SuperNodes' client-id from 0 or raise partition.num_clients"
            )
        if cid in claims:
            raise FederationError(
                f"SuperNodes {claims[cid]} and {node} both hold client {cid}; give each --node-config its own client-id"
            )
        if cid in self.node_of and self.node_of[cid] != node:
            log.info("client %d is now on SuperNode %d (was %d)", cid, node, self.node_of[cid])
        claims[cid] = self.node_of[cid] = node
        self.size[cid], self.step_count[cid] = num_examples, steps

    # ------------------------------------------------------------------ logging

    def finished(self, round: int, update: ClientUpdate) -> None:
        steps = int(update.metrics.get("steps", 0))
        for i in range(steps):  # the node trained remotely: advance the step display at once
            self.progress.step(i + 1, steps, float(update.metrics.get("loss", 0.0)))
        self.progress.client_finished(round, update.client_id, update.metrics)


def no_reply(reply, timeout: Optional[float]) -> str:
    """Why a message got no usable reply (``reply`` None or an error): none within ``timeout``,
    or the error the node (or the SuperLink, for a node that went away) sent."""
    if reply is None:
        return f"no reply within flower.round_timeout={timeout:g}s" if timeout else "no reply (it could not be sent)"
    return f"{reply.error.reason} (Flower error code {reply.error.code})"


def exchange(grid, messages: dict, timeout: Optional[float], poll: float = POLL_SECONDS) -> dict:
    """Push ``messages`` ({key: Message}) and pull their replies until all are in or
    ``timeout`` seconds pass (None: no limit; the SuperLink answers for nodes that go away).
    Returns {key: reply}. Replies are matched by the message they answer, which also matches
    the errors the SuperLink writes itself (their sender is the SuperLink, not the node)."""
    keys = list(messages)
    ids = list(grid.push_messages([messages[k] for k in keys]))
    pending = {i: k for i, k in zip(ids, keys) if i}
    replies: dict = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            key = pending.pop(reply.metadata.reply_to_message_id, None)
            if key is not None:
                replies[key] = reply
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll)
    return replies
