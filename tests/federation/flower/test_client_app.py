import json

from ray import cloudpickle
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from hypothesis import given, settings, strategies as st

from fedtune.client.sft import LocalTrainer
from fedtune.config import dump_yaml, load_config
from fedtune.data.prompts import Encoded
from fedtune.errors import ConfigError
from fedtune.federation import setup
from fedtune.federation.flower import client_app, records


def rows_file(path, n):
    path.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}", "category": "c"}) + "\n" for i in range(n)))
    return path


def test_a_data_owner_trains_on_every_row_of_its_own_file(tiny_config, tmp_path):
    client, examples = client_app.node_examples(tiny_config, {"data-path": str(rows_file(tmp_path / "mine.jsonl", 5)), "client-id": 3})
    assert client == 3 and [e.instruction for e in examples] == [f"say {i}" for i in range(5)]


def test_a_partition_node_trains_on_the_in_process_shard(tiny_config):
    examples, _, partition = setup.load_and_split(tiny_config)
    client, mine = client_app.node_examples(tiny_config, {"partition-id": 2, "num-partitions": 4})
    assert client == 2 and mine == [examples[i] for i in partition.shards[2]]


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({"data-path": "x.jsonl"}, "data-path needs client-id=N"),
        ({"data-path": "x.jsonl", "client-id": "0"}, "data-path needs client-id=N"),
        ({}, "names no data: start it with --node-config 'data-path="),
        ({"partition-id": 9}, "partition-id=9, but partition.num_clients=4"),
    ],
)
def test_node_config_mistakes_say_what_to_pass(tiny_config, node_config, message):
    with pytest.raises(ConfigError, match=message):
        client_app.node_examples(tiny_config, node_config)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60), batch=st.integers(1, 8), accum=st.integers(1, 3), epochs=st.integers(1, 3),
    steps=st.one_of(st.none(), st.integers(1, 9)), by_length=st.booleans(), lengths_seed=st.integers(0, 99),
)
def test_count_steps_is_the_length_of_the_trainers_plan(n, batch, accum, epochs, steps, by_length, lengths_seed):
    cfg = load_config(None, [f"train.batch_size={batch}", f"train.grad_accum={accum}", f"train.local_epochs={epochs}",
                             f"train.local_steps={'null' if steps is None else steps}", f"train.batching={'length' if by_length else 'random'}"])
    trainer = LocalTrainer(None, {"w": torch.nn.Parameter(torch.zeros(1))}, pad_id=0, batch_size=batch, grad_accum=accum,
                           local_epochs=epochs, local_steps=steps, by_length=by_length)
    lengths = torch.Generator().manual_seed(lengths_seed)
    examples = [Encoded(torch.zeros(int(torch.randint(1, 50, (1,), generator=lengths)), dtype=torch.long), 0) for _ in range(n)]

    assert client_app.count_steps(cfg, n, 1) == len(trainer.plan(client_id=1, round=3, examples=examples))


def train_message(cfg, client, adapter):
    content = records.train_content(adapter, client=client, round=1, lr=cfg.train.lr, client_config={})
    return Message(content, dst_node_id=7, message_type="train")


def test_the_client_app_fit_is_the_in_process_fit_and_the_model_loads_once(tiny_config, monkeypatch):
    monkeypatch.setattr(client_app, "CACHE", client_app.NodeCache())
    bundle = setup.build_model(tiny_config)
    examples, _, partition = setup.load_and_split(tiny_config)
    encoded = setup.encode_examples(bundle.tokenizer, [examples[i] for i in partition.shards[1]], "chat", tiny_config.data.max_length)
    expected = setup.build_trainer(tiny_config, bundle).fit(1, encoded, bundle.initial_adapter, round=1, lr=tiny_config.train.lr)
    # Ray pickles the app for every message: the handlers must still reach this process's cache.
    app = cloudpickle.loads(cloudpickle.dumps(client_app.make_client_app(dump_yaml(tiny_config))))
    threads = torch.get_num_threads()  # the ClientApp sets its threads; the same ones give the same floats
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 4, "threads": threads}, state=RecordDict(), run_config={})

    replies = [app(train_message(tiny_config, 1, bundle.initial_adapter), context) for _ in range(2)]

    for reply in replies:
        update = records.read_update(reply.content, expected_client=1)
        assert update.num_examples == len(encoded) and update.metrics["steps"] == 3
        assert all(torch.equal(update.delta[k], expected.delta[k]) for k in expected.delta)
    assert client_app.CACHE.model_loads == 1


def test_a_message_for_another_client_is_refused(tiny_config, monkeypatch):
    monkeypatch.setattr(client_app, "CACHE", client_app.NodeCache())
    app = client_app.make_client_app(dump_yaml(tiny_config))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    adapter = setup.build_model(tiny_config).initial_adapter
    with pytest.raises(Exception, match="a message for client 2 reached the SuperNode holding client 0"):
        app(train_message(tiny_config, 2, adapter), context)


def test_the_query_answer_needs_no_model(tiny_config, monkeypatch):
    monkeypatch.setattr(client_app, "CACHE", client_app.NodeCache())
    app = client_app.make_client_app(dump_yaml(tiny_config))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    _, _, partition = setup.load_and_split(tiny_config)

    reply = app(Message(records.query_content(), dst_node_id=7, message_type="query"), context)

    assert records.read_node(reply.content) == (3, len(partition.shards[3]), 3)
    assert client_app.CACHE.model_loads == 0


def test_deployment_reads_the_config_from_the_run_config(tiny_config):
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(Exception, match="the Flower run config has no 'fedtune-config'"):
        client_app.app(Message(records.query_content(), dst_node_id=7, message_type="query"), context)


def test_a_malicious_node_sends_its_attack(tiny_overrides, monkeypatch):
    cfg = load_config(None, tiny_overrides + ["attack.fraction=1.0", "attack.kind=sign_flip"])  # every client attacks
    monkeypatch.setattr(client_app, "CACHE", client_app.NodeCache())
    bundle = setup.build_model(cfg)
    examples, _, partition = setup.load_and_split(cfg)
    encoded = setup.encode_examples(bundle.tokenizer, [examples[i] for i in partition.shards[2]], "chat", cfg.data.max_length)
    honest = setup.build_trainer(cfg, bundle).fit(2, encoded, bundle.initial_adapter, round=1, lr=cfg.train.lr)
    app = client_app.make_client_app(dump_yaml(cfg))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "threads": torch.get_num_threads()}, state=RecordDict(), run_config={})

    update = records.read_update(app(train_message(cfg, 2, bundle.initial_adapter), context).content, expected_client=2)

    assert update.metrics["malicious"] == 1  # Flower metric records carry the flag as 1
    assert all(torch.equal(update.delta[k], -honest.delta[k]) for k in honest.delta)


def test_with_federated_eval_a_node_holds_out_its_own_rows_like_the_in_process_split(tiny_config, tmp_path):
    from fedtune.federation.client_eval import split_rows

    cfg = load_config(None, [*_overrides(tiny_config), "eval.federated=true"])
    own = {"data-path": str(rows_file(tmp_path / "mine.jsonl", 10)), "client-id": 3}
    _, train = client_app.node_examples(cfg, own)
    _, held = client_app.node_examples(cfg, own, held_out=True)
    everything = client_app.node_examples(tiny_config, own)[1]
    assert (train, held) == split_rows(cfg, 3, everything) and len(held) == 1 and len(train) == 9
    examples, _, partition = setup.load_and_split(cfg)
    assert client_app.node_examples(cfg, {"partition-id": 2})[1] == [examples[i] for i in partition.shards[2]]
    assert client_app.node_examples(cfg, {"partition-id": 2}, held_out=True)[1] == [examples[i] for i in partition.client_holdout[2]]
    assert client_app.node_examples(tiny_config, own, held_out=True)[1] == []  # off: nothing held out, every row trains


def _overrides(cfg):
    return [f"model.name={cfg.model.name}", f"data.demo_per_category={cfg.data.demo_per_category}", "partition.method=shards",
            f"partition.num_clients={cfg.partition.num_clients}", f"partition.holdout_per_category={cfg.partition.holdout_per_category}"]


def test_a_dpo_node_uses_the_runs_initial_adapter_as_its_reference(tiny_overrides, tmp_path, monkeypatch):
    # Arrange: a saved adapter unlike a fresh LoRA init (its B matrices are not zero)
    from fedtune.model.lora import save_adapter

    monkeypatch.setattr(client_app, "CACHE", client_app.NodeCache())
    bundle = setup.build_model(load_config(None, tiny_overrides))
    start = {k: torch.full_like(v, 0.01) for k, v in bundle.initial_adapter.items()}
    save_adapter(tmp_path / "sft", start, bundle.peft_config)
    cfg = load_config(None, tiny_overrides + ["task=dpo", "dpo.reference=initial", f"model.init_adapter={tmp_path / 'sft'}"])

    # Act
    trainer = client_app.CACHE.get_trainer(cfg)

    # Assert: the reference policy is the run's starting adapter, as in-process
    assert all(torch.equal(trainer.reference_adapter(bundle.initial_adapter)[k], start[k]) for k in start)


def test_a_long_lived_node_reloads_what_changed_and_only_that(tiny_config, tmp_path, monkeypatch):
    # Arrange: a node process that outlives a run (a SuperNode's worker, a Ray actor)
    monkeypatch.setattr(client_app, "CACHE", client_app.NodeCache())
    cache, rows = client_app.CACHE, rows_file(tmp_path / "mine.jsonl", 8)
    node = {"data-path": str(rows), "client-id": 0, "cache-dir": str(tmp_path / "shards")}
    cache.get_trainer(tiny_config, node)
    _, first = cache.get_shard(tiny_config, node)

    # Act: the same run again, then the data owner's file changes, then the model's files do
    cache.get_trainer(tiny_config, node)
    _, same = cache.get_shard(tiny_config, node)
    rows_file(rows, 5)
    _, changed = cache.get_shard(tiny_config, node)
    config = tiny_config.model.name + "/config.json"
    torch.save({}, tmp_path / "x")  # a later mtime than the model's files
    import os

    os.utime(config, ns=(os.stat(tmp_path / "x").st_mtime_ns + 10**9,) * 2)
    cache.get_trainer(tiny_config, node)

    # Assert
    assert same is first and len(first) == 8
    assert len(changed) == 5
    assert cache.model_loads == 2
