import math

import pytest
import torch

from fedtune.client.dpo import (
    PreferenceTrainer,
    pair_logps,
    pair_stats,
    preference_loss,
    reference_logps,
    reference_policy,
)
from fedtune.data.demo_preferences import demo_preferences
from fedtune.data.preferences import PreferencePair, collate_pairs, encode_preferences
from fedtune.model.base import load_model
from fedtune.model.lora import adapter_parameters, attach_lora, get_adapter, set_adapter
from fedtune.types import PROX_MU, SERVER_CONTROL
from tests.tolerance import FORWARD, adapters_close, margin_scale, numbers_close

T = torch.tensor


def lora_model(path, dropout=0.0):
    base = load_model(str(path), dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=dropout, target_modules="all-linear", seed=0, base_name=str(path))
    return model, adapter_parameters(model)


def random_adapter(params, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in get_adapter(params).items()}


PAIRS = [
    PreferencePair((("user", "What is 2 plus 2?"),), "4", "Five, obviously.", "math"),
    PreferencePair((("user", "Capital of France?"), ("assistant", "Paris."), ("user", "And of Spain?")), "Madrid.", "No idea.", "geo"),
    PreferencePair((("user", "Say hi"),), "Hello! How can I help?", "Go away.", "chat"),
]


# ----------------------------------------------------------------------------- the loss, by hand


def test_sigmoid_loss_by_hand():
    # h = (-1 - -2) - (-3 - -2) = 2; beta*h = 1
    args = (T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]))
    assert preference_loss(*args, beta=0.5).item() == pytest.approx(math.log(1 + math.exp(-1)))
    smoothed = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))  # conservative DPO
    assert preference_loss(*args, beta=0.5, label_smoothing=0.1).item() == pytest.approx(smoothed)
    robust = (0.9 * math.log(1 + math.exp(-1)) - 0.1 * math.log(1 + math.exp(1))) / 0.8
    assert preference_loss(*args, beta=0.5, loss_type="robust", label_smoothing=0.1).item() == pytest.approx(robust)
    assert preference_loss(*args, beta=0.25, loss_type="hinge").item() == pytest.approx(0.5)  # max(0, 1 - 0.5)
    # ipo: per-token mean log-ratios 1/2 - (-1)/4 = 0.75; (0.75 - 1/(2*0.5))^2
    ipo = preference_loss(*args, beta=0.5, loss_type="ipo", chosen_tokens=T([2]), rejected_tokens=T([4]))
    assert ipo.item() == pytest.approx(0.0625)


def test_policy_equal_to_reference_is_at_chance():
    x = T([-5.0, -7.0])
    losses = preference_loss(x, x, x, x, beta=0.1)
    stats = pair_stats(losses, x, x, x, x, beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert stats["reward_accuracy"].tolist() == [0.5, 0.5]  # ties count one half
    assert stats["margin"].tolist() == [0.0, 0.0]


def test_rewards_and_accuracy_by_hand():
    stats = pair_stats(T([0.0, 0.0]), T([-1.0, -4.0]), T([-3.0, -2.0]), T([-2.0, -2.0]), T([-2.0, -2.0]), beta=0.5)
    assert stats["chosen_reward"].tolist() == [0.5, -1.0]
    assert stats["rejected_reward"].tolist() == [-0.5, 0.0]
    assert stats["margin"].tolist() == [1.0, -1.0]
    assert stats["reward_accuracy"].tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------- against trl


# trl 1.16's sigmoid loss ignores label_smoothing (conservative DPO is checked by hand above)
@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_loss_and_rewards_equal_trl(tiny_model_dir, tokenizer, tmp_path, loss_type, smoothing):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, params = lora_model(tiny_model_dir)
    initial = random_adapter(params, 1)
    set_adapter(params, initial)
    args = DPOConfig(
        output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], label_smoothing=smoothing, report_to=[], use_cpu=True,
        precompute_ref_log_probs=False,
    )
    data = Dataset.from_list([{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)  # copies `initial` as its reference
    set_adapter(params, random_adapter(params, 2))  # the policy moves away from the reference
    batch = collate_pairs(encode_preferences(tokenizer, PAIRS, "chat", 64), tokenizer.pad_token_id)
    model.eval()

    with torch.no_grad():
        theirs = trainer._compute_loss(
            model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                    "completion_mask": (batch["labels"] != -100).long()}, False,
        )
        chosen, rejected, chosen_tokens, rejected_tokens = pair_logps(model, batch)
        (ref,) = reference_logps(model, params, [batch], initial)
        ours = preference_loss(
            chosen, rejected, ref[:, 0], ref[:, 1], beta=0.3, loss_type=loss_type, label_smoothing=smoothing,
            chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
        )
    stats = pair_stats(ours, chosen, rejected, ref[:, 0], ref[:, 1], beta=0.3)

    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-4, abs=1e-6)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert stats["margin"].mean().item() == pytest.approx(logged["rewards/margins"], rel=1e-4, abs=1e-6)
    assert stats["chosen_reward"].mean().item() == pytest.approx(logged["rewards/chosen"], rel=1e-4, abs=1e-6)
    assert chosen.mean().item() == pytest.approx(logged["logps/chosen"], rel=1e-5)


# ----------------------------------------------------------------------------- the reference policy


def test_reference_with_adapter_disabled_equals_the_base_model(tiny_model_dir, tokenizer):
    model, params = lora_model(tiny_model_dir)
    set_adapter(params, random_adapter(params, 3))
    base = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu")).eval()
    batch = collate_pairs(encode_preferences(tokenizer, PAIRS, "chat", 64), tokenizer.pad_token_id)

    (ref,) = reference_logps(model, params, [batch], None)
    with torch.no_grad():
        chosen, rejected, _, _ = pair_logps(base, batch)
        policy, _, _, _ = pair_logps(model.eval(), batch)

    assert torch.allclose(ref[:, 0], chosen, atol=1e-5) and torch.allclose(ref[:, 1], rejected, atol=1e-5)
    assert not torch.allclose(policy, chosen, atol=1e-2)  # the adapter is live again, and it matters


def test_reference_policy_restores_the_live_adapter(tiny_model_dir):
    model, params = lora_model(tiny_model_dir)
    live, other = random_adapter(params, 4), random_adapter(params, 5)
    set_adapter(params, live)
    with reference_policy(model, params, other):
        assert all(torch.equal(params[k].detach(), other[k]) for k in other)
    assert all(torch.equal(params[k].detach(), live[k]) for k in live)


# ----------------------------------------------------------------------------- local training


@pytest.fixture
def setup(tiny_model_dir, tokenizer):
    model, params = lora_model(tiny_model_dir, dropout=0.1)
    encoded = encode_preferences(tokenizer, demo_preferences(3)[:16], "chat", 64)
    return model, params, encoded, tokenizer.pad_token_id, get_adapter(params)


def trainer(setup, **kw):
    model, params, _, pad, initial = setup
    args = dict(pad_id=pad, batch_size=4, local_steps=3, beta=0.5, initial_adapter=initial, seed=0)
    args.update(kw)
    return PreferenceTrainer(model, params, **args)


def test_fit_returns_delta_and_dpo_metrics(setup):
    _, params, encoded, _, _ = setup
    start = get_adapter(params)
    update = trainer(setup).fit(2, encoded, start, round=1, lr=1e-2)
    assert update.client_id == 2 and update.num_examples == len(encoded)
    assert update.delta.keys() == start.keys() and any(v.abs().sum() > 0 for v in update.delta.values())
    m = update.metrics
    for key in ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp"):
        assert math.isfinite(m[key]), key
    assert m["steps"] == 3 and m["tokens"] > 0 and m["real_tokens"] <= m["padded_tokens"]


def test_fit_is_deterministic_and_leaks_nothing_between_clients(setup):
    _, params, encoded, _, _ = setup
    g = get_adapter(params)
    t = trainer(setup)
    t.fit(0, encoded[:8], g, round=1, lr=1e-2)
    after_other = t.fit(1, encoded[8:], g, round=1, lr=1e-2)
    alone = trainer(setup).fit(1, encoded[8:], g, round=1, lr=1e-2)
    assert all(torch.equal(after_other.delta[k], alone.delta[k]) for k in g)


def test_training_raises_the_margin_on_its_pairs(setup):
    model, params, encoded, pad, _ = setup
    g = get_adapter(params)
    t = trainer(setup, local_steps=40, batch_size=8)
    t.fit(0, encoded, g, round=1, lr=2e-2)
    batch = collate_pairs(encoded, pad)
    (ref,) = reference_logps(model, params, [batch], g)
    with torch.no_grad():
        chosen, rejected, _, _ = pair_logps(model.eval(), batch)
    stats = pair_stats(chosen, chosen, rejected, ref[:, 0], ref[:, 1], beta=0.5)
    assert stats["margin"].mean() > 0.5 and stats["reward_accuracy"].mean() > 0.8


def test_reference_global_versus_initial(setup, tiny_model_dir):
    # without LoRA dropout, whose noise (std ~0.12 in the margin here) would hide the signal
    model, params = lora_model(tiny_model_dir, dropout=0.0)
    _, _, encoded, pad, _ = setup
    moved = random_adapter(params, 6, scale=0.2)  # this round's global adapter, not the initial one
    no_dropout = (model, params, encoded, pad, get_adapter(params))
    by_global = trainer(no_dropout, reference="global", local_steps=1).fit(0, encoded, moved, round=1, lr=1e-9)
    by_initial = trainer(no_dropout, reference="initial", local_steps=1).fit(0, encoded, moved, round=1, lr=1e-9)
    # against its own starting point the policy has no reward yet
    assert numbers_close(by_global.metrics["margin"], 0.0, FORWARD, margin_scale(by_global.metrics, 0.5))
    assert abs(by_initial.metrics["margin"]) > 0.01


def test_fedprox_and_scaffold_reach_dpo_training(setup):
    # the strategy hooks live in the shared optimizer step, so DPO gets them like SFT
    _, params, encoded, _, _ = setup
    g = get_adapter(params)
    plain = trainer(setup).fit(0, encoded, g, round=1, lr=1e-2)
    mu_zero = trainer(setup).fit(0, encoded, g, round=1, lr=1e-2, client_config={PROX_MU: 0.0})
    assert all(torch.equal(plain.delta[k], mu_zero.delta[k]) for k in g)
    zeros = {k: torch.zeros_like(v) for k, v in g.items()}
    scaffold = trainer(setup).fit(0, encoded, g, round=1, lr=1e-2, client_config={SERVER_CONTROL: zeros}, client_control=zeros)
    assert all(torch.equal(plain.delta[k], scaffold.delta[k]) for k in g)
    assert scaffold.control_delta.keys() == g.keys() and any(v.abs().sum() > 0 for v in scaffold.control_delta.values())
    pulled = trainer(setup).fit(0, encoded, g, round=1, lr=1e-2, client_config={PROX_MU: 100.0})
    assert sum(v.norm() for v in pulled.delta.values()) < sum(v.norm() for v in plain.delta.values())
    assert trainer(setup).fit(0, encoded, g, round=1, lr=1e-2, local_steps=1).metrics["steps"] == 1


def test_packed_fit_equals_padded_fit(setup, tiny_model_dir):
    from fedtune.model.attention import use_packed_attention

    model, params = lora_model(tiny_model_dir, dropout=0.0)
    assert use_packed_attention(model)
    _, _, encoded, pad, _ = setup
    no_dropout = (model, params, encoded, pad, get_adapter(params))
    start = random_adapter(params, 3, scale=0.1)
    padded = trainer(no_dropout).fit(0, encoded, start, round=1, lr=1e-2)
    packed = trainer(no_dropout, packing=True).fit(0, encoded, start, round=1, lr=1e-2)
    assert adapters_close(padded.delta, packed.delta)
    assert numbers_close(padded.metrics["loss"], packed.metrics["loss"], FORWARD)
    assert numbers_close(padded.metrics["margin"], packed.metrics["margin"], FORWARD, margin_scale(padded.metrics, 0.5))
    assert packed.metrics["padded_tokens"] == packed.metrics["real_tokens"] < padded.metrics["padded_tokens"]
