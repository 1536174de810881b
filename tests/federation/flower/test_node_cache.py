import copy

import pytest
import torch
from flwr.app import Context, RecordDict

from fedtune.config import dump_yaml
from fedtune.data.preferences import EncodedPair
from fedtune.data.prompts import Encoded
from fedtune.data.sources import Example
from fedtune.federation import setup
from fedtune.federation.flower import client_app, node_cache, records


def examples(n=3, text="say"):
    return [Example(instruction=f"{text} {i}", input="", output=f"{i}", category="c") for i in range(n)]


def encode(tokenizer, rows, template="chat", max_length=32):
    return setup.encode_examples(tokenizer, rows, template, max_length)


def key(tokenizer, rows, template="chat", max_length=32):
    return node_cache.shard_key(rows, node_cache.tokenizer_fingerprint(tokenizer), template, max_length)


def test_a_shard_is_tokenised_once_then_read_from_the_nodes_disk(tokenizer, tmp_path):
    rows = examples()
    first, second = node_cache.ShardCache(tmp_path), node_cache.ShardCache(tmp_path)  # two processes, one disk

    built = first.get(key(tokenizer, rows), lambda: encode(tokenizer, rows))
    read = second.get(key(tokenizer, rows), lambda: pytest.fail("tokenised again"))

    assert (first.builds, first.hits, second.builds, second.hits) == (1, 0, 0, 1)
    assert [(e.prompt_len, e.input_ids.tolist()) for e in read] == [(e.prompt_len, e.input_ids.tolist()) for e in built]
    assert not list(tmp_path.glob("*.tmp"))


def test_the_shard_key_changes_with_the_data_tokenizer_template_and_max_length(tokenizer):
    rows = examples()
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["<fedtune-new-token>"])
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = "{{ messages }}"

    base = key(tokenizer, rows)

    assert key(tokenizer, examples()) == base  # the same text from another file or process
    assert key(tokenizer, examples(text="tell")) != base
    assert key(tokenizer, examples(n=4)) != base
    assert key(other_tokenizer, rows) != base
    assert key(templated, rows) != base
    assert key(tokenizer, rows, template="plain") != base
    assert key(tokenizer, rows, max_length=64) != base


def test_a_damaged_cache_file_is_rebuilt(tokenizer, tmp_path):
    rows = examples()
    k = key(tokenizer, rows)
    (tmp_path / f"{k}.pt").write_bytes(b"not a torch file")
    cache = node_cache.ShardCache(tmp_path)

    encoded = cache.get(k, lambda: encode(tokenizer, rows))

    assert cache.builds == 1 and len(encoded) == 3
    assert len(node_cache.ShardCache(tmp_path).get(k, lambda: pytest.fail("rebuilt twice"))) == 3


def test_pack_round_trips_single_examples_and_preference_pairs():
    one = Encoded(torch.tensor([1, 2, 3]), 1)
    pair = EncodedPair(Encoded(torch.tensor([1, 4]), 1), Encoded(torch.tensor([1, 5, 6]), 1))

    back = [node_cache.unpack(node_cache.pack(e)) for e in (one, pair)]

    assert back[0].prompt_len == 1 and torch.equal(back[0].input_ids, one.input_ids)
    assert torch.equal(back[1].rejected.input_ids, pair.rejected.input_ids) and back[1].chosen.prompt_len == 1


@pytest.mark.parametrize("node_config, omp, cpus, expected", [
    ({"threads": 3}, "2", 1.0, 3),  # the node's own setting wins
    ({}, "2", 1.0, 2),  # then what the operator (or Ray) put in OMP_NUM_THREADS
    ({}, None, 1.0, 1),  # then flower.client_cpus
    ({}, None, 2.5, 2),
    ({}, None, 0.5, 1),
    ({"threads": 0}, "", 1.0, 1),
])
def test_client_threads(monkeypatch, node_config, omp, cpus, expected):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)

    assert node_cache.client_threads(node_config, cpus) == expected


def test_process_age_is_the_life_of_this_process():
    age = node_cache.process_age()
    assert age is None or age > 0


def test_the_client_app_sets_its_threads_and_reads_its_shard_from_disk_in_a_new_process(tiny_config, tmp_path, monkeypatch):
    app = client_app.make_client_app(dump_yaml(tiny_config))
    node = {"partition-id": 1, "num-partitions": 4, "cache-dir": str(tmp_path / "node"), "threads": 1}
    adapter = setup.build_model(tiny_config).initial_adapter
    message = records.train_content(adapter, client=1, round=1, lr=tiny_config.train.lr, client_config={})
    torch.set_num_threads(2)

    replies = []
    for _ in range(2):  # a deployment: a fresh process (cache) per message
        monkeypatch.setattr(client_app, "CACHE", client_app.NodeCache())
        context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
        replies.append(records.read_update(app(client_app.Message(message, dst_node_id=7, message_type="train"), context).content, 1))

    first, second = (r.metrics for r in replies)
    assert torch.get_num_threads() == 1 and first["torch_threads"] == second["torch_threads"] == 1
    assert (first["shard_builds"], first["shard_disk_hits"], second["shard_builds"], second["shard_disk_hits"]) == (1, 0, 0, 1)
    assert first["model_loads"] == second["model_loads"] == 1 and first["model_load_seconds"] > 0
    assert all(torch.equal(replies[0].delta[k], replies[1].delta[k]) for k in replies[0].delta)


def test_a_changed_tokenizer_file_changes_the_shard_key(tokenizer, tmp_path):
    from fedtune.model.base import load_tokenizer

    tokenizer.save_pretrained(tmp_path)
    before = node_cache.tokenizer_fingerprint(load_tokenizer(str(tmp_path)))
    config = tmp_path / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"model_max_length"', '"unused_key": 1, "model_max_length"', 1))

    assert node_cache.tokenizer_fingerprint(load_tokenizer(str(tmp_path))) != before
