import math

import pytest
import torch

from fedtune.data.demo_preferences import demo_preferences
from fedtune.data.preferences import encode_preferences
from fedtune.evaluation.preferences import PreferenceEvaluator
from fedtune.model.base import load_model
from fedtune.model.lora import adapter_parameters, attach_lora, get_adapter, set_adapter
from tests.tolerance import FORWARD, numbers_close


@pytest.fixture
def setup(tiny_model_dir, tokenizer):
    base = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=0.1, target_modules="all-linear", seed=0, base_name=str(tiny_model_dir))
    params = adapter_parameters(model)
    pairs = demo_preferences(2)[:12]
    encoded = encode_preferences(tokenizer, pairs, "chat", 64)
    return model, params, encoded, [p.category for p in pairs], tokenizer.pad_token_id


def evaluator(setup, reference_adapter, **kw):
    _, params, encoded, categories, pad = setup
    return PreferenceEvaluator(encoded, categories, params=params, reference_adapter=reference_adapter, batch_size=5, pad_id=pad, beta=0.1, **kw)


def test_the_starting_point_is_at_chance(setup):
    model, params, _, categories, _ = setup
    initial = get_adapter(params)
    result = evaluator(setup, initial).evaluate(model)
    assert result["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result["reward_accuracy"] == 0.5 and result["margin"] == 0.0
    assert result["examples"] == 12
    assert set(result["per_category"]) == set(categories)
    assert sum(c["examples"] for c in result["per_category"].values()) == 12


def test_metrics_follow_the_live_adapter_against_a_fixed_reference(setup):
    model, params, _, _, _ = setup
    initial = get_adapter(params)
    ev = evaluator(setup, initial)
    first = ev.evaluate(model)
    g = torch.Generator().manual_seed(0)
    moved = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in initial.items()}
    set_adapter(params, moved)
    second = ev.evaluate(model)
    assert all(torch.equal(params[k].detach(), moved[k]) for k in moved)  # evaluation leaves the live adapter alone
    assert second["chosen_logp"] != pytest.approx(first["chosen_logp"])
    assert second["margin"] != 0.0
    # mean of differences vs difference of means
    assert numbers_close(second["margin"], second["chosen_reward"] - second["rejected_reward"], FORWARD,
                         max(abs(second["chosen_reward"]), abs(second["rejected_reward"])))
    set_adapter(params, initial)
    assert ev.evaluate(model)["margin"] == 0.0  # the reference was computed once and kept
    assert model.training  # the mode is restored


def test_base_reference_with_a_fresh_adapter_is_also_at_chance(setup):
    model, params, _, _, _ = setup
    result = evaluator(setup, None, loss_type="ipo").evaluate(model)  # LoRA B starts at zero: policy == base
    assert result["reward_accuracy"] == 0.5 and result["margin"] == pytest.approx(0.0, abs=1e-6)
    assert result["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)  # ipo at h = 0: (1/(2 beta))^2


def test_per_pair_accuracy_and_margin_in_pair_order(setup):
    # Arrange: a moved adapter, so pairs differ; batches of 5 are sorted by length (another order than the pairs')
    model, params, encoded, _, pad = setup
    initial = get_adapter(params)
    ev = evaluator(setup, initial)
    g = torch.Generator().manual_seed(1)
    set_adapter(params, {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in initial.items()})

    # Act
    result = ev.evaluate(model, per_example=True)

    # Assert: the per-pair values average to the reported means, and pair i alone gives its own values
    per = result["per_example"]
    assert len(per["reward_accuracy"]) == 12 and set(per["reward_accuracy"]) <= {0.0, 0.5, 1.0}
    assert sum(per["reward_accuracy"]) / 12 == pytest.approx(result["reward_accuracy"], rel=1e-6)
    for i in (0, 7):
        alone = PreferenceEvaluator([encoded[i]], ["c"], params=params, reference_adapter=initial, batch_size=1, pad_id=pad,
                                    beta=0.1)
        assert alone.evaluate(model)["margin"] == pytest.approx(per["margin"][i], rel=1e-3, abs=1e-6)
    assert "per_example" not in ev.evaluate(model)


@pytest.mark.parametrize("n, max_tokens", [(12, 300), (1, None), (7, 60)])  # several pairs a row; one pair; pairs over budget
def test_packed_evaluation_equals_padded(setup, n, max_tokens):
    from fedtune.model.attention import use_packed_attention
    from tests.tolerance import margin_scale

    model, params, encoded, categories, pad = setup
    assert use_packed_attention(model)
    initial = get_adapter(params)
    g = torch.Generator().manual_seed(1)
    set_adapter(params, {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in initial.items()})
    kw = dict(params=params, reference_adapter=initial, batch_size=5, pad_id=pad, beta=0.1, max_tokens=max_tokens)
    packed = PreferenceEvaluator(encoded[:n], categories[:n], packing=True, **kw)
    padded = PreferenceEvaluator(encoded[:n], categories[:n], packing=False, **kw)
    a, b = packed.evaluate(model), padded.evaluate(model)
    assert all(batch["input_ids"].shape[0] == 1 for batch in packed.batches)  # one row each, no padding
    if max_tokens == 60:
        assert len(packed.batches) == n  # every pair alone
    assert a["examples"] == b["examples"] == n and set(a["per_category"]) == set(b["per_category"])
    for got, want in [(a, b), *((a["per_category"][c], b["per_category"][c]) for c in b["per_category"])]:
        scale = margin_scale(want, 0.1)
        for key in ("loss", "chosen_logp", "rejected_logp"):
            assert numbers_close(got[key], want[key], FORWARD), key
        for key in ("margin", "chosen_reward", "rejected_reward"):
            assert numbers_close(got[key], want[key], FORWARD, scale), key
        assert got["reward_accuracy"] == want["reward_accuracy"]


def test_only_a_base_reference_is_cacheable(setup):
    _, params, _, _, _ = setup
    initial = get_adapter(params)  # LoRA B = 0: the base model
    moved = {k: v + 0.1 for k, v in initial.items()}
    assert evaluator(setup, None).cache_key() == evaluator(setup, initial).cache_key() is not None
    assert evaluator(setup, moved).cache_key() is None
    assert evaluator(setup, None, loss_type="ipo").cache_key() != evaluator(setup, None).cache_key()
