import pytest

from fedtune.data.prompts import ALPACA_NO_INPUT, collate, encode_pairs, pack, render_example, render_prompt, to_device
from fedtune.errors import ModelError


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("inp", ["", "some context"])
def test_labels_cover_exactly_the_response(tokenizer, template, inp):
    prompt, response = render_example(tokenizer, template, "Name a color.", inp, "Blue.")
    (enc,) = encode_pairs(tokenizer, [(prompt, response)], max_length=512, template=template)
    batch = collate([enc], tokenizer.pad_token_id)
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    text = tokenizer.decode(labelled)
    assert text.startswith("Blue.")
    assert "Name a color" not in text and "context" not in text
    # the response ends with the end-of-turn token so the model learns to stop
    assert labelled[-1].item() in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\n")} or text.rstrip().endswith(
        tokenizer.eos_token
    )
    # prompt tokens are exactly what the model sees at generation time
    prompt_ids = enc.input_ids[: enc.prompt_len]
    assert tokenizer.decode(prompt_ids) == tokenizer.decode(
        tokenizer(render_prompt(tokenizer, template, "Name a color.", inp), add_special_tokens=(template == "alpaca"))["input_ids"]
    )


def test_alpaca_template_text(tokenizer):
    assert render_prompt(tokenizer, "alpaca", "Do X", "") == ALPACA_NO_INPUT.format(instruction="Do X")
    assert "### Input:\nctx" in render_prompt(tokenizer, "alpaca", "Do X", "ctx")


def test_truncation_keeps_max_length(tokenizer):
    pair = render_example(tokenizer, "alpaca", "word " * 100, "", "answer " * 100)
    (enc,) = encode_pairs(tokenizer, [pair], max_length=64, template="alpaca")
    assert enc.input_ids.numel() == 64
    assert enc.response_tokens == 0  # the prompt alone fills max_length: nothing to learn, and it is counted


def test_collate_pads_right_and_masks_padding(tokenizer):
    encs = encode_pairs(tokenizer, [("a b c d e", "f"), ("a", "b c")], max_length=64, template="alpaca")
    batch = collate(encs, pad_id=tokenizer.pad_token_id)
    short = 1 if encs[1].input_ids.numel() < encs[0].input_ids.numel() else 0
    n = encs[short].input_ids.numel()
    assert batch["attention_mask"][short, :n].all() and not batch["attention_mask"][short, n:].any()
    assert (batch["labels"][short, n:] == -100).all()


def test_chat_template_required(tokenizer):
    class NoTemplate:
        chat_template = None
        name_or_path = "plain-model"

    with pytest.raises(ModelError, match="plain-model has no chat template; set data.template=alpaca"):
        render_prompt(NoTemplate(), "chat", "hi")


def test_to_device_moves_a_batch_but_keeps_packed_segments_on_the_cpu(tokenizer):
    """Per-example attention reads the example lengths in Python once per layer; on a GPU each
    read would make the host wait (model/attention.py)."""
    import torch

    encoded = encode_pairs(tokenizer, [render_example(tokenizer, "alpaca", "Hi", "", "Hello"), render_example(tokenizer, "alpaca", "Go", "", "Ok")], 64, "alpaca")
    packed = to_device(pack(encoded), torch.device("meta"))
    assert {k: v.device.type for k, v in packed.items()} == {"input_ids": "meta", "labels": "meta", "position_ids": "meta", "segments": "cpu"}
    padded = to_device(collate(encoded, tokenizer.pad_token_id), torch.device("meta"))
    assert {v.device.type for v in padded.values()} == {"meta"}
