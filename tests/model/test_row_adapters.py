"""Several adapters in one batch answer and score exactly as each adapter loaded alone."""

import pytest
import torch

from fedtune.errors import CheckpointError
from fedtune.model.base import load_model
from fedtune.model.generate import generate, generate_ids, render_prompts
from fedtune.model.lora import adapter_parameters, attach_lora, get_adapter, set_adapter
from fedtune.model.row_adapters import BASE, RowAdapters, answer_each, stackable, stacks
from tests.lora_model import active_lora_model

PROMPTS = ["Hi", "What sound does a cow make?", "Name three primary colours.", "2+2?", "Why is the sea salty?"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return active_lora_model(tiny_model_dir, seed=3)


def random_adapters(model, count: int) -> list[dict]:
    params = adapter_parameters(model)
    g = torch.Generator().manual_seed(11)
    return [{k: torch.randn(v.shape, generator=g) * 0.3 for k, v in get_adapter(params).items()} for _ in range(count)]


def test_each_row_scores_as_its_adapter_alone(model, tokenizer):
    params = adapter_parameters(model)
    own = get_adapter(params)
    adapters = random_adapters(model, 3)
    batch = tokenizer(PROMPTS[:4], return_tensors="pt", padding=True)
    groups = [2, BASE, 0, 2]
    model.eval()
    with torch.inference_mode():
        with RowAdapters(model, adapters).route(groups):
            mixed = model(**batch).logits
        for row, g in enumerate(groups):
            if g == BASE:
                with model.disable_adapter():
                    alone = model(**batch).logits[row]
            else:
                set_adapter(params, adapters[g])
                alone = model(**batch).logits[row]
            scale = alone.abs().max()
            assert torch.allclose(mixed[row], alone, rtol=0, atol=1e-5 * scale), (row, g)
    set_adapter(params, own)
    model.train()


def test_mixed_batches_answer_as_each_adapter_alone(model, tokenizer):
    params = adapter_parameters(model)
    own = get_adapter(params)
    adapters = random_adapters(model, 3) + [None]  # None: the base model
    texts = render_prompts(tokenizer, PROMPTS, None, "chat")
    alone = []
    for adapter in adapters:
        if adapter is None:
            with model.disable_adapter():
                alone.append(generate_ids(model, tokenizer, texts, add_special_tokens=False, max_new_tokens=10, batch_size=1))
        else:
            set_adapter(params, adapter)
            alone.append(generate_ids(model, tokenizer, texts, add_special_tokens=False, max_new_tokens=10, batch_size=1))
    set_adapter(params, own)
    before = generate_ids(model, tokenizer, texts, add_special_tokens=False, max_new_tokens=10, batch_size=1)
    assert len({tuple(map(tuple, a)) for a in alone + [before]}) == len(adapters) + 1  # every adapter answers differently
    rows = RowAdapters(model, adapters)
    groups = [k for k in range(len(adapters)) for _ in texts]
    mixed = generate_ids(model, tokenizer, texts * len(adapters), add_special_tokens=False, max_new_tokens=10, batch_size=7,
                         groups=groups, route=rows.route)
    assert mixed == [row for answers in alone for row in answers]
    # the model is as it was: its own adapter on and unchanged, no hooks left
    assert all(not layer._forward_hooks for layer in rows.layers.values())
    assert generate_ids(model, tokenizer, texts, add_special_tokens=False, max_new_tokens=10, batch_size=1) == before
    assert model.training


def test_only_plain_lora_linear_layers_are_stacked(tiny_model_dir, model):
    assert stackable(model)
    base = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert not stackable(dora)


def test_an_adapter_of_another_shape_is_refused(model):
    adapters = random_adapters(model, 1)
    key = next(k for k in adapters[0] if "lora_A" in k)
    adapters[0][key] = adapters[0][key][:2]
    with pytest.raises(CheckpointError, match=r"shape \(2, 64\), the model expects \(4, 64\); check lora.r"):
        RowAdapters(model, adapters)  # the one line loading it into the model gives (a traceback before)


@pytest.mark.parametrize("kind", ["plain", "dora"])
def test_answer_each_equals_each_adapter_alone_and_falls_back_where_lora_does_not_stack(tiny_model_dir, tokenizer, kind):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=kind == "dora"))
    params = adapter_parameters(model)
    g = torch.Generator().manual_seed(5)
    adapters = [{k: v + torch.randn(v.shape, generator=g) * 0.3 for k, v in get_adapter(params).items()} for _ in range(2)]
    alone = []
    for adapter in adapters:
        set_adapter(params, adapter)
        alone.append(generate(model, tokenizer, PROMPTS, template="chat", max_new_tokens=8, batch_size=1))
    assert alone[0] != alone[1]
    assert stacks(model, adapters) == (kind == "plain")
    assert answer_each(model, params, adapters, tokenizer, PROMPTS, inputs=[""] * len(PROMPTS), template="chat",
                       max_new_tokens=8, batch_size=4) == alone


def test_a_block_that_flattens_the_rows_answers_one_adapter_at_a_time(tokenizer, tmp_path):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    Qwen2MoeForCausalLM(config).save_pretrained(tmp_path)
    model = attach_lora(load_model(str(tmp_path), dtype=torch.float32, device=torch.device("cpu")), r=4, alpha=8, dropout=0.0,
                        target_modules="all-linear", seed=0, base_name=str(tmp_path))
    params = adapter_parameters(model)
    g = torch.Generator().manual_seed(5)
    adapters = [{k: torch.randn(v.shape, generator=g) * 0.3 for k, v in get_adapter(params).items()} for _ in range(2)]
    assert stackable(model) and not stacks(model, adapters)  # the shared expert sees the tokens flattened
    alone = []
    for adapter in adapters:
        set_adapter(params, adapter)
        alone.append(generate(model, tokenizer, PROMPTS[:3], template="chat", max_new_tokens=4, batch_size=1))
    assert answer_each(model, params, adapters, tokenizer, PROMPTS[:3], inputs=[""] * 3, template="chat",
                       max_new_tokens=4, batch_size=4) == alone
