"""Packed held-out evaluation equals the padded one and a one-example-at-a-time reference."""

import pytest
import torch
import torch.nn.functional as F

from fedtune.data.demo import demo_examples
from fedtune.data.prompts import encode_pairs, render_example
from fedtune.data.prompts import Encoded
from fedtune.evaluation.heldout import HeldoutEvaluator, eval_groups, prompt_prefix
from fedtune.federation import setup
from fedtune.model.attention import use_packed_attention
from tests.lora_model import active_lora_model
from tests.tolerance import FORWARD, numbers_close


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return active_lora_model(tiny_model_dir, seed=0)


def encoded(tokenizer, n: int, max_length: int):
    rows = demo_examples(4)[:n]
    texts = [render_example(tokenizer, "chat", e.instruction, e.input, e.output) for e in rows]
    return encode_pairs(tokenizer, texts, max_length, "chat"), [e.category for e in rows]


def one_at_a_time(model, examples, categories) -> dict:
    """The reference: each example alone through the model's plain forward, no batching at all."""
    nll, tok = {}, {}
    model.eval()
    with torch.no_grad():
        for e, c in zip(examples, categories):
            logits = model(input_ids=e.input_ids[None]).logits[0, :-1]  # (t-1, V)
            targets = e.input_ids[1:].clone()
            targets[: max(e.prompt_len - 1, 0)] = -100  # predictions of prompt tokens do not count
            nll[c] = nll.get(c, 0.0) + float(F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100))
            tok[c] = tok.get(c, 0) + int((targets != -100).sum())
    model.train()
    return {"loss": sum(nll.values()) / sum(tok.values()), "tokens": sum(tok.values()),
            "per_category": {c: nll[c] / tok[c] for c in nll}}


def assert_matches(result, ref):
    assert result["tokens"] == ref["tokens"]
    assert numbers_close(result["loss"], ref["loss"], FORWARD)
    assert set(result["per_category"]) == set(ref["per_category"])
    for c, loss in ref["per_category"].items():
        assert numbers_close(result["per_category"][c]["loss"], loss, FORWARD), c


@pytest.mark.parametrize("n, max_length, max_tokens", [
    (13, 49, 120),   # odd and mixed lengths (some cut at 49), several examples per packed row
    (1, 64, None),   # a single example
    (9, 64, 40),     # every example (46-54 tokens) longer than the token budget: each goes alone
])
def test_packed_evaluation_equals_padded_and_one_at_a_time(model, tokenizer, n, max_length, max_tokens):
    examples, categories = encoded(tokenizer, n, max_length)
    pad = tokenizer.pad_token_id
    packed = HeldoutEvaluator(examples, categories, batch_size=4, pad_id=pad, packing=True, max_tokens=max_tokens)
    padded = HeldoutEvaluator(examples, categories, batch_size=4, pad_id=pad, packing=False, max_tokens=max_tokens)
    shared = HeldoutEvaluator(examples, categories, batch_size=4, pad_id=pad, packing=True, max_tokens=max_tokens, shared_prefix=True)
    ref = one_at_a_time(model, examples, categories)
    a, b, c = packed.evaluate(model), padded.evaluate(model), shared.evaluate(model)
    assert_matches(a, ref)
    assert_matches(b, ref)
    assert_matches(c, ref)  # the common start run once, every example attending to it
    cut = shared.batching["shared_prefix"]
    assert cut >= 20 and packed.batching["shared_prefix"] == 0  # the chat template's system prompt, at least
    assert sum(batch["input_ids"].numel() for batch, _ in shared.batches) == sum(int(e.input_ids.numel()) - cut for e in examples)
    assert a["examples"] == b["examples"] == c["examples"] == n
    assert all(batch["input_ids"].shape[0] == 1 and "segments" in batch for batch, _ in packed.batches)  # no padding
    assert sum(batch["input_ids"].numel() for batch, _ in packed.batches) == sum(int(e.input_ids.numel()) for e in examples)
    if max_tokens is not None and max_length > max_tokens:
        assert len(packed.batches) == n


def test_the_shared_prefix_stays_inside_every_prompt():
    def row(ids, prompt_len):
        return Encoded(torch.tensor(ids), prompt_len)

    same = [1, 2, 3, 4, 5, 6]
    assert prompt_prefix([row(same + [7, 8], 7), row(same + [9], 8)]) == 6
    assert prompt_prefix([row(same + [7, 8], 4), row(same + [9], 8)]) == 0  # 3 tokens before the first response token: too few
    assert prompt_prefix([row(same + [7, 8], 6), row(same + [9, 9], 8)]) == 5  # leaves the token that predicts the response
    assert prompt_prefix([row([0] + same, 7), row(same + [9], 7)]) == 0  # different first tokens
    assert prompt_prefix([]) == 0


def test_shared_prefix_evaluation_stays_close_under_bf16(model, tokenizer):
    examples, categories = encoded(tokenizer, 6, 64)
    kw = dict(batch_size=4, pad_id=tokenizer.pad_token_id, packing=True, max_tokens=200, precision="bf16")
    plain = HeldoutEvaluator(examples, categories, **kw)
    shared = HeldoutEvaluator(examples, categories, shared_prefix=True, **kw)
    assert shared.cache_key() != plain.cache_key()  # other numbers: never reused for each other
    assert numbers_close(shared.evaluate(model)["loss"], plain.evaluate(model)["loss"], 0.02)


def test_eval_groups_cover_every_position_once_within_the_budget():
    sizes = [5, 50, 7, 9, 30, 3, 41]
    groups = eval_groups(sizes, batch_size=3, max_tokens=40, packed=True)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert all(len(g) == 1 or sum(sizes[i] for i in g) <= 40 for g in groups)
    assert eval_groups(sizes, batch_size=3, max_tokens=None, packed=False) == [[5, 0, 2], [3, 4, 6], [1]]
    # packed under a budget: the budget alone cuts (no padding to limit), so the fewest rows
    assert eval_groups(sizes, batch_size=2, max_tokens=100, packed=True) == [[1, 6], [4, 3, 2, 0, 5]]
    assert eval_groups(sizes, batch_size=2, max_tokens=None, packed=True) == [[5, 0], [2, 3], [4, 6], [1]]  # unbounded: batch_size


def test_held_out_batches_hold_four_times_the_training_tokens():
    from fedtune.federation.setup import CPU_BATCH_TOKENS, eval_token_limit

    assert eval_token_limit(None, torch.device("cpu")) == 4 * CPU_BATCH_TOKENS and eval_token_limit(500, torch.device("cpu")) == 2000
    assert eval_token_limit(None, torch.device("cuda")) is None


def test_evaluation_runs_in_the_training_precision(model, tokenizer):
    examples, categories = encoded(tokenizer, 6, 64)
    kw = dict(batch_size=4, pad_id=tokenizer.pad_token_id, packing=True, max_tokens=200)
    fp32 = HeldoutEvaluator(examples, categories, **kw).evaluate(model)
    bf16 = HeldoutEvaluator(examples, categories, precision="bf16", **kw)
    assert bf16.cache_key() != HeldoutEvaluator(examples, categories, **kw).cache_key()  # never reused across precisions
    low = bf16.evaluate(model)
    assert low["loss"] != fp32["loss"] and numbers_close(low["loss"], fp32["loss"], 0.02)  # bf16 autocast, as training


@pytest.mark.parametrize("packing", [False, True])
def test_per_example_sums_are_in_example_order_and_add_up_to_the_loss(tiny_config, packing):
    # Arrange: examples of different lengths, so the length-sorted batches reorder them
    bundle = setup.build_model(tiny_config)
    assert not packing or use_packed_attention(bundle.model)  # per-example attention inside a packed row
    examples = demo_examples(per_category=2, seed=0)[:7]
    encoded = setup.encode_examples(bundle.tokenizer, examples, tiny_config.data.template, 64)
    evaluator = HeldoutEvaluator(encoded, [e.category for e in examples], batch_size=3, pad_id=bundle.tokenizer.pad_token_id,
                                 packing=packing, max_tokens=160)
    one_by_one = [HeldoutEvaluator([x], ["c"], batch_size=1, pad_id=bundle.tokenizer.pad_token_id) for x in encoded]

    # Act
    result = evaluator.evaluate(bundle.model, per_example=True)

    # Assert
    per = result["per_example"]
    assert per["tokens"] == [int(x.response_tokens) for x in encoded]
    assert sum(per["nll"]) / sum(per["tokens"]) == pytest.approx(result["loss"], rel=1e-6)
    for i, ev in enumerate(one_by_one):  # example i alone has the loss its per-example entry says
        assert per["nll"][i] / per["tokens"][i] == pytest.approx(ev.evaluate(bundle.model)["loss"], rel=1e-4)
    assert "per_example" not in evaluator.evaluate(bundle.model)  # only on request (metrics.jsonl stays small)
