"""Answer prompts with the model as it stands (base, or with an adapter loaded)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fedtune.data.prompts import render_prompt
from fedtune.reporting.progress import GENERATION, Progress


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
    progress: Optional[Progress] = None,
    phase: str = GENERATION,
) -> list[str]:
    """Greedy (temperature 0) or sampled answers, one per prompt, formatted as in training;
    ``progress`` sees a phase named ``phase`` advanced per answered prompt."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right; no gradients, so left padding is safe
    inputs = list(inputs) if inputs is not None else [""] * len(prompts)
    texts = [render_prompt(tokenizer, template, p, i) for p, i in zip(prompts, inputs)]
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        with (progress or Progress()).phase(phase, len(texts)) as shown:
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
                shown.advance(len(new))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers

