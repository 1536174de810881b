import pytest

from fedtune.data.demo import demo_examples
from fedtune.evaluation.heldout import HeldoutEvaluator
from fedtune.federation import setup


def test_per_example_sums_are_in_example_order_and_add_up_to_the_loss(tiny_config):
    # Arrange: examples of different lengths, so the length-sorted batches reorder them
    bundle = setup.build_model(tiny_config)
    examples = demo_examples(per_category=2, seed=0)[:7]
    encoded = setup.encode_examples(bundle.tokenizer, examples, tiny_config.data.template, 64)
    evaluator = HeldoutEvaluator(encoded, [e.category for e in examples], batch_size=3, pad_id=bundle.tokenizer.pad_token_id)
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
