"""Batched greedy generation answers exactly as one prompt at a time."""

import pytest
import torch

from fedtune.model.generate import batch_bounds, generate, generate_ids, render_prompts
from fedtune.reporting.progress import Progress
from tests.lora_model import active_lora_model

PROMPTS = ["Hi", "What sound does a cow make?", "Name three primary colours, and say why they are called primary.",
           "2+2?", "Write a haiku about the sea and the wind over the harbour at night", "Why?", "Spell 'cat' backwards."]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return active_lora_model(tiny_model_dir, seed=3)  # as a run leaves it: generation must still be plain SDPA


class Counter(Progress):
    def __init__(self):
        self.done = 0

    def phase_advanced(self, name, n):
        self.done += n


def test_batched_greedy_tokens_equal_one_at_a_time(model, tokenizer):
    texts = render_prompts(tokenizer, PROMPTS, None, "chat")
    alone = generate_ids(model, tokenizer, texts, add_special_tokens=False, max_new_tokens=12, batch_size=1)
    # an end-of-sequence token that some answers reach mid-way: each sequence must stop on its own
    common = [t for row in alone for t in row[2:8]]
    eos = max(set(common), key=common.count)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        alone = generate_ids(model, tokenizer, texts, add_special_tokens=False, max_new_tokens=12, batch_size=1)
        counter = Counter()
        batched = generate_ids(model, tokenizer, texts, add_special_tokens=False, max_new_tokens=12, batch_size=4, progress=counter)
    finally:
        model.generation_config.eos_token_id = saved
    assert any(len(r) < 12 for r in alone) and any(len(r) == 12 for r in alone)  # some stopped early, some ran to the limit
    assert batched == alone
    assert counter.done == len(PROMPTS)
    assert model.training and tokenizer.padding_side == "right"  # mode and padding side restored


def test_the_shared_prefix_is_run_once_per_batch_and_not_where_the_cache_cannot_hold_it(model, tokenizer, tmp_path, monkeypatch):
    from transformers import MistralConfig, MistralForCausalLM

    from fedtune.model import generate as module
    from fedtune.model.base import load_model

    seen = []
    real = module.kv_cache
    monkeypatch.setattr(module, "kv_cache", lambda output: seen.append(real(output)) or seen[-1])
    texts = render_prompts(tokenizer, PROMPTS, None, "chat")
    alone = generate_ids(model, tokenizer, texts, add_special_tokens=False, max_new_tokens=6, batch_size=1)
    assert seen == []  # one prompt per batch: nothing shared
    assert generate_ids(model, tokenizer, texts, add_special_tokens=False, max_new_tokens=6, batch_size=4) == alone
    assert len(seen) == 2 and all(cache is not None for _, cache in seen)  # 4 + 3 prompts: one prefix pass each

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    windowed = load_model(str(tmp_path), dtype=torch.float32, device=torch.device("cpu"))
    seen.clear()
    one = generate_ids(windowed, tokenizer, texts, add_special_tokens=False, max_new_tokens=6, batch_size=1)
    assert generate_ids(windowed, tokenizer, texts, add_special_tokens=False, max_new_tokens=6, batch_size=3) == one
    assert [cache for _, cache in seen] == [None]  # a sliding window: tried once, then every row prefilled whole


def test_generate_answers_in_prompt_order(model, tokenizer):
    one = generate(model, tokenizer, PROMPTS, template="chat", max_new_tokens=5, batch_size=1)
    many = generate(model, tokenizer, PROMPTS, template="chat", max_new_tokens=5, batch_size=3)
    assert one == many and len(one) == len(PROMPTS)


def test_prompts_are_cut_into_the_fewest_near_equal_batches():
    assert batch_bounds(40, 32) == [(0, 20), (20, 40)]  # not 32 + 8
    assert batch_bounds(10, 4) == [(0, 4), (4, 7), (7, 10)]
    assert batch_bounds(7, 7) == [(0, 7)]
    assert batch_bounds(3, 1) == [(0, 1), (1, 2), (2, 3)]
    assert batch_bounds(0, 8) == []
