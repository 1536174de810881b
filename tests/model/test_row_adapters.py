"""Several adapters in one batch answer and score exactly as each adapter loaded alone."""

import pytest
import torch

from fedtune.model.base import load_model
from fedtune.model.generate import generate_ids, render_prompts
from fedtune.model.lora import adapter_parameters, get_adapter, set_adapter
from fedtune.model.row_adapters import BASE, RowAdapters, stackable
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
    assert torch.equal(get_adapter(params)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       own["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])  # the model's own adapter untouched
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
    assert len({tuple(map(tuple, a)) for a in alone}) == len(adapters)  # the adapters answer differently
    rows = RowAdapters(model, adapters)
    groups = [k for k in range(len(adapters)) for _ in texts]
    mixed = generate_ids(model, tokenizer, texts * len(adapters), add_special_tokens=False, max_new_tokens=10, batch_size=7,
                         groups=groups, route=rows.route)
    assert mixed == [row for answers in alone for row in answers]
    # the model is as it was: its own adapter on, no hooks left
    again = generate_ids(model, tokenizer, texts[:2], add_special_tokens=False, max_new_tokens=10, batch_size=1)
    assert all(not layer._forward_hooks for layer in rows.layers.values())
    assert again == generate_ids(model, tokenizer, texts[:2], add_special_tokens=False, max_new_tokens=10, batch_size=2)


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
    with pytest.raises(ValueError, match="does not fit"):
        RowAdapters(model, adapters)
