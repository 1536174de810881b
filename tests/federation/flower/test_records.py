import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedtune.federation.flower import records
from fedtune.types import ClientUpdate

ADAPTER = {
    "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.tensor([[0.5], [-1.25], [3.0]]),
}


def test_adapter_round_trip_keeps_keys_values_and_dtype():
    back = records.from_record(records.to_record(ADAPTER))
    assert list(back) == list(ADAPTER)
    for k in ADAPTER:
        assert back[k].dtype == torch.float32 and torch.equal(back[k], ADAPTER[k])
    back[next(iter(back))][0, 0] = 99.0  # a writable copy, not a view of the message buffer


def test_train_message_carries_round_lr_and_the_strategy_client_config():
    control = {k: torch.full_like(v, 0.25) for k, v in ADAPTER.items()}
    content = records.train_content(ADAPTER, client=3, round=7, lr=1e-4, client_config={"prox_mu": 0.01, "c": control, "t": torch.ones(2)})

    adapter, client, round, lr, client_config = records.read_train(content)

    assert (client, round, lr) == (3, 7, 1e-4)
    assert all(torch.equal(adapter[k], ADAPTER[k]) for k in ADAPTER)
    assert client_config["prox_mu"] == 0.01
    assert all(torch.equal(client_config["c"][k], control[k]) for k in control)
    assert torch.equal(client_config["t"], torch.ones(2))


def test_update_round_trip_with_control_delta():
    update = ClientUpdate(2, 40, ADAPTER, {"loss": 1.5, "steps": 3}, control_delta={k: -v for k, v in ADAPTER.items()})

    back = records.read_update(records.update_content(update), expected_client=2)

    assert (back.client_id, back.num_examples, back.metrics) == (2, 40, {"loss": 1.5, "steps": 3})
    assert all(torch.equal(back.delta[k], ADAPTER[k]) and torch.equal(back.control_delta[k], -ADAPTER[k]) for k in ADAPTER)


@pytest.mark.parametrize(
    "content, reason",
    [
        (RecordDict({}), "lacks the 'update' or 'delta' record"),
        (RecordDict({"delta": records.to_record(ADAPTER), "update": ConfigRecord({"client": 2})}), "num_examples is missing"),
        (RecordDict({"delta": records.to_record(ADAPTER), "update": ConfigRecord({"client": 2, "num_examples": 1.5})}), "not an integer"),
        (RecordDict({"delta": records.to_record(ADAPTER), "update": ConfigRecord({"client": 5, "num_examples": 4})}), "says it is client 5"),
    ],
)
def test_malformed_replies_raise_a_reason(content, reason):
    with pytest.raises(records.ReplyError, match=reason):
        records.read_update(content, expected_client=2)


def test_a_float64_delta_arrives_as_float64_for_the_validator_to_reject():
    content = RecordDict({
        "delta": records.to_record({k: v.double() for k, v in ADAPTER.items()}),
        "update": ConfigRecord({"client": 0, "num_examples": 4}),
    })
    assert all(v.dtype == torch.float64 for v in records.read_update(content, 0).delta.values())


def test_node_answer_round_trip_and_validation():
    assert records.read_node(records.node_content(4, 120, 8)) == (4, 120, 8)
    with pytest.raises(records.ReplyError, match="no valid client"):
        records.read_node(RecordDict({"node": ConfigRecord({"client": -1, "num_examples": 3, "steps": 1})}))
    with pytest.raises(records.ReplyError):
        records.read_node(RecordDict({}))


def test_evaluate_message_and_score_round_trip():
    adapter, client, rnd = records.read_evaluate(records.evaluate_content(ADAPTER, 3, 7))
    assert (client, rnd) == (3, 7) and all(torch.equal(adapter[k], v) for k, v in ADAPTER.items())
    sums = {"math / algebra": {"examples": 2, "tokens": 11, "loss": 20.5}, "code": {"examples": 1, "tokens": 4, "loss": 3.25}}
    assert records.read_score(records.score_content(3, sums), 3) == sums


@pytest.mark.parametrize(
    "content, reason",
    [
        (RecordDict({}), "lacks the 'score' or 'sums' record"),
        (records.score_content(4, {"a": {"examples": 1, "loss": 1.0}}), "says it is client 4"),
        (records.score_content(3, {"a": {"examples": -1, "loss": 1.0}}), "sum 0.examples=-1"),
        (records.score_content(3, {"a": {"examples": 1, "loss": float("nan")}}), "is not a finite number"),
        (records.score_content(3, {"a": {"loss": 1.0}}), "no example count"),
    ],
)
def test_malformed_scores_raise_a_reason(content, reason):
    with pytest.raises(records.ReplyError, match=reason):
        records.read_score(content, 3)


def test_an_adapter_travels_as_two_arrays_whatever_its_tensor_count():
    many = {f"t{i}": torch.full((i % 3 + 1, 2), float(i)) for i in range(50)}
    record = records.to_record(many)
    assert sorted(record.keys()) == ["layout", "packed"]
    back = records.from_record(record)
    assert list(back) == list(many) and all(torch.equal(back[k], many[k]) for k in many)
    assert records.from_record(records.to_record({})) == {}


def uint8(n):
    return Array(torch.zeros(n, dtype=torch.uint8).numpy())


@pytest.mark.parametrize(
    "record, reason",
    [
        (lambda: ArrayRecord({"x": Array(torch.zeros(2).numpy())}), r"has arrays \['x'\], not 'layout' and 'packed'"),
        (lambda: ArrayRecord({"layout": uint8(3), "packed": uint8(4)}), "cannot be read"),
        (lambda: ArrayRecord({"layout": records.to_record({"a": torch.zeros(2)})["layout"], "packed": uint8(12)}), "4 bytes its layout does not name"),
        (lambda: ArrayRecord({"layout": records.to_record({"a": torch.zeros(2)})["layout"], "packed": uint8(4)}), "runs past the packed bytes"),
    ],
)
def test_a_broken_adapter_record_raises_a_reason(record, reason):
    with pytest.raises(records.ReplyError, match=reason):
        records.from_record(record())
