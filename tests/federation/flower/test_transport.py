import json
import math

import pytest
import torch
from flwr.app import Error, Message

from fedtune.errors import FederationError
from fedtune.federation.flower import records
from fedtune.federation.flower.transport import FlowerClients
from fedtune.reporting.metrics import MetricsLog, read_metrics
from fedtune.reporting.progress import Progress
from fedtune.server.validate import validate_updates
from fedtune.types import ClientUpdate

GLOBAL = {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}


def delta(value: float) -> dict:
    return {k: torch.full_like(v, value) for k, v in GLOBAL.items()}


class FakeGrid:
    """Nodes answer in-process: ``nodes[node_id] = (client id, train handler)``; a handler
    returns a RecordDict, an Error (sent as the SuperLink does: from the SuperLink, not the
    node), or None (no reply)."""

    def __init__(self, nodes: dict):
        self.nodes = nodes
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent.append(m)
            ids.append(m.metadata.message_id)
            client, handler = self.nodes[m.metadata.dst_node_id]
            if m.metadata.message_type == "query":
                answer = records.node_content(client, 10 * (client + 1), client + 2)
            else:
                answer = handler(m)
            if isinstance(answer, Error):
                reply = Message(answer, reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = 1  # SUPERLINK_NODE_ID
                self.replies[m.metadata.message_id] = reply
            elif answer is not None:
                self.replies[m.metadata.message_id] = Message(answer, reply_to=m)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def trains(value: float, **update):
    """A handler that replies with a delta of ``value`` everywhere (and ``update`` overrides)."""

    def handler(m):
        _, client, _, _, _ = records.read_train(m.content)
        u = ClientUpdate(client, 10 * (client + 1), delta(value), {"loss": 1.0, "steps": 2, "tokens": 5, "seconds": 0.1})
        for k, v in update.items():
            setattr(u, k, v)
        return records.update_content(u)

    return handler


def make(tmp_path, nodes, *, num_clients=None, min_clients=1, **kw):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    clients = FlowerClients(
        FakeGrid(nodes), num_clients=num_clients or len(nodes), min_clients=min_clients, progress=Progress(),
        metrics=metrics, connect_timeout=kw.pop("connect_timeout", 5.0), **kw,
    )
    return clients, metrics


def lines(metrics, kind):
    return [r for r in read_metrics(metrics.path) if r["type"] == kind]


def test_nodes_say_which_client_they_hold(tmp_path):
    clients, metrics = make(tmp_path, {901: (1, None), 902: (0, None)})

    assert clients.sizes() == [10, 20] and clients.steps(0, 1) == 2 and clients.steps(1, 5) == 3
    assert clients.node_of == {0: 902, 1: 901}
    assert lines(metrics, "nodes") == [{"type": "nodes", "round": 0, "clients": {"0": 10, "1": 20}, "missing": []}]


def test_fit_returns_valid_updates_in_client_order(tmp_path):
    clients, _ = make(tmp_path, {901: (1, trains(2.0)), 902: (0, trains(1.0))})

    updates, failures = clients.fit(1, [0, 1], GLOBAL, {"prox_mu": 0.1}, lr=0.5)

    assert [u.client_id for u in updates] == [0, 1] and [u.num_examples for u in updates] == [10, 20]
    assert torch.equal(updates[1].delta["a.lora_A.weight"], torch.full((2, 3), 2.0))
    sent = [records.read_train(m.content) for m in clients.grid.sent if m.metadata.message_type == "train"]
    assert sorted((c, r, lr, cc["prox_mu"]) for _, c, r, lr, cc in sent) == [(0, 1, 0.5, 0.1), (1, 1, 0.5, 0.1)]


def wrong_key(m):
    u = ClientUpdate(1, 20, {"a.lora_A.weight": torch.zeros(2, 3), "b.lora_B.weight": torch.zeros(3, 2)}, {})
    return records.update_content(u)


def wrong_shape(m):
    return records.update_content(ClientUpdate(1, 20, {**delta(0.0), "a.lora_B.weight": torch.zeros(2, 3)}, {}))


def wrong_dtype(m):
    return records.update_content(ClientUpdate(1, 20, {k: v.double() for k, v in delta(0.0).items()}, {}))


def nan_values(m):
    return records.update_content(ClientUpdate(1, 20, delta(math.nan), {}))


def no_examples(m):
    content = records.update_content(ClientUpdate(1, 20, delta(0.0), {}))
    del content["update"]["num_examples"]
    return content


@pytest.mark.parametrize(
    "bad, reason",
    [
        (wrong_key, "adapter keys differ"),
        (wrong_shape, "tensor a.lora_B.weight is (2, 3)"),
        (wrong_dtype, "torch.float64, expected (2, 3) torch.float32"),
        (nan_values, "NaN or Inf"),
    ],
)
def test_the_transport_passes_a_bad_update_on_and_the_loops_validation_rejects_it(tmp_path, bad, reason):
    clients, metrics = make(tmp_path, {901: (0, trains(1.0)), 902: (1, bad)})

    updates, failures = clients.fit(2, [0, 1], GLOBAL, {}, lr=0.1)
    accepted, rejected, _ = validate_updates(GLOBAL, updates, None)  # the round loop's one validation

    assert failures == [] and [u.client_id for u in updates] == [0, 1]
    assert [u.client_id for u in accepted] == [0]
    (r,) = rejected
    assert r.client_id == 1 and reason in r.reason


def test_a_reply_that_does_not_decode_is_a_failure(tmp_path):
    clients, metrics = make(tmp_path, {901: (0, trains(1.0)), 902: (1, no_examples)})

    updates, failures = clients.fit(2, [0, 1], GLOBAL, {}, lr=0.1)

    assert [u.client_id for u in updates] == [0]
    (failed,) = failures
    assert failed.client_id == 1 and not failed.simulated and "num_examples is missing" in failed.reason


def test_failed_silent_and_missing_clients_are_logged_and_the_round_goes_on(tmp_path):
    unavailable = lambda m: Error(code=5, reason="Error: Node Unavailable")  # noqa: E731 - what the SuperLink sends
    clients, metrics = make(
        tmp_path, {901: (0, trains(1.0)), 902: (1, unavailable), 903: (2, lambda m: None)}, num_clients=4, round_timeout=0.5
    )

    updates, failures = clients.fit(1, [0, 1, 2, 3], GLOBAL, {}, lr=0.1)

    assert [u.client_id for u in updates] == [0]
    failed = {f.client_id: f.reason for f in failures}
    assert set(failed) == {1, 2, 3}
    assert "Node Unavailable (Flower error code 5)" in failed[1]
    assert "no reply within flower.round_timeout=0.5s" in failed[2]
    assert "no SuperNode holding this client is connected" in failed[3]
    assert lines(metrics, "nodes")[0]["missing"] == [3]


def test_fewer_updates_than_min_clients_is_the_round_loops_call_not_the_transports(tmp_path):
    clients, metrics = make(tmp_path, {901: (0, trains(1.0)), 902: (1, lambda m: Error(code=5, reason="gone"))}, min_clients=2)

    updates, failures = clients.fit(4, [0, 1], GLOBAL, {}, lr=0.1)  # no AggregationError here (was raised before)

    assert [u.client_id for u in updates] == [0] and [f.client_id for f in failures] == [1]


def test_rollbacks_travel_with_every_train_message_of_the_session(tmp_path):
    clients, _ = make(tmp_path, {901: (0, trains(1.0))})
    clients.rollback(3)
    clients.fit(3, [0], GLOBAL, {}, lr=0.1)
    clients.rollback(4)  # a skipped round
    clients.fit(5, [0], GLOBAL, {}, lr=0.1)

    sent = [records.read_rollbacks(m.content) for m in clients.grid.sent if m.metadata.message_type == "train"]
    assert sent == [(clients.session, [3]), (clients.session, [3, 4])]


def test_two_nodes_claiming_one_client_or_an_unknown_client_stop_the_run(tmp_path):
    with pytest.raises(FederationError, match="SuperNodes 901 and 902 both hold client 0"):
        make(tmp_path, {901: (0, None), 902: (0, None)})[0].sizes()
    with pytest.raises(FederationError, match="holds client 5, but partition.num_clients=2"):
        make(tmp_path, {901: (0, None), 902: (5, None)})[0].sizes()


def test_too_few_nodes_within_the_connect_timeout(tmp_path):
    clients, _ = make(tmp_path, {901: (0, None)}, num_clients=3, min_clients=2, connect_timeout=0.5)
    with pytest.raises(FederationError, match="1 of 3 clients connected within flower.connect_timeout=0.5s"):
        clients.sizes()


def test_a_node_that_joins_later_is_asked_and_used(tmp_path):
    clients, metrics = make(tmp_path, {901: (0, trains(1.0))}, num_clients=2, connect_timeout=0.5)
    first, failures = clients.fit(1, [0, 1], GLOBAL, {}, lr=0.1)
    assert [u.client_id for u in first] == [0] and [f.client_id for f in failures] == [1]

    clients.grid.nodes[977] = (1, trains(3.0))  # client 1's SuperNode (re)connects under a new node id
    updates, failures = clients.fit(2, [0, 1], GLOBAL, {}, lr=0.1)

    assert [u.client_id for u in updates] == [0, 1] and clients.node_of[1] == 977 and failures == []
    json.dumps(list(read_metrics(metrics.path)))  # every line is plain JSON


def test_compressed_uploads_are_decoded_and_a_bad_payload_rejected(tmp_path):
    from fedtune.federation.compression import Compression, encode_upload

    int8 = Compression("int8")

    def sends_int8(value, rank=None):
        def handler(m):
            _, client, _, _, _ = records.read_train(m.content)
            u = ClientUpdate(client, 10, delta(value), {}, rank=rank)
            payload, _ = encode_upload(u, int8, None)
            return records.update_content(u, payload)
        return handler

    def truncated(m):
        content = sends_int8(1.0)(m)
        payload = records.from_record(content["delta"])
        content["delta"] = records.to_record({k: v for k, v in payload.items() if k != "a.lora_B.weight::s"})
        return content

    clients, _ = make(tmp_path, {901: (0, sends_int8(0.5, rank=1)), 902: (1, truncated)}, compression=int8)
    updates, failures = clients.fit(1, [0, 1], GLOBAL, {}, lr=0.1)

    (u,) = updates
    assert u.rank == 1 and all(torch.allclose(u.delta[k], delta(0.5)[k], atol=0.5 / 127) for k in GLOBAL)
    assert [f.client_id for f in failures] == [1] and "int8 payload does not decode" in failures[0].reason


def scores(loss_sum: float):
    def handler(m):
        _, client, _ = records.read_evaluate(m.content)
        return records.score_content(client, {"c": {"examples": client + 1, "tokens": 10, "loss": loss_sum}})

    return handler


def test_evaluate_returns_the_sums_and_reports_failures_like_fit(tmp_path):
    unavailable = lambda m: Error(code=5, reason="Error: Node Unavailable")  # noqa: E731
    clients, _ = make(tmp_path, {901: (0, scores(4.0)), 902: (1, unavailable), 903: (2, lambda m: None), 904: (3, scores(float("inf")))},
                      num_clients=5, round_timeout=0.5)

    got, failures = clients.evaluate(2, [0, 1, 2, 3, 4], GLOBAL)

    assert got == {0: {"c": {"examples": 1, "tokens": 10, "loss": 4.0}}}
    failed = {f.client_id: f.reason for f in failures}
    assert "Node Unavailable (Flower error code 5)" in failed[1] and "no reply within flower.round_timeout=0.5s" in failed[2]
    assert "evaluation rejected" in failed[3] and "no SuperNode holding this client is connected" in failed[4]
    sent = [m for m in clients.grid.sent if m.metadata.message_type == "evaluate"]
    assert [records.read_evaluate(m.content)[1:] for m in sent] == [(0, 2), (1, 2), (2, 2), (3, 2)]
