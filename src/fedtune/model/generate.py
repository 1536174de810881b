"""Answer prompts with the model as it stands (base, or with an adapter loaded)."""

from __future__ import annotations

from typing import Sequence

import torch

from fedtune.data.prompts import render_prompt


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    template: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    inputs: Sequence[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> list[str]:
    """Greedy (temperature 0) or sampled answers, one per prompt, formatted as in training."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right; no gradients, so left padding is safe
    inputs = list(inputs) if inputs is not None else [""] * len(prompts)
    texts = [render_prompt(tokenizer, template, p, i) for p, i in zip(prompts, inputs)]
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=(template == "alpaca"),
            ).to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + start)  # sampling is reproducible and leaves the caller's RNG alone
                out = model.generate(**batch, **kwargs)  # (b, t_prompt + t_new)
            new = out[:, batch["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


@torch.inference_mode()
def chat_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0) -> str:
    """The assistant's next turn for a chat history (``[{"role", "content"}, ...]``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(**batch, **kwargs)
    model.train(was_training)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
