"""Answer prompts with the model as it stands (base, or with an adapter loaded).

Prompts are answered in batches of at most ``batch_size`` (``eval.generation_batch_size``):
sorted by length (little padding) and cut into the fewest batches of near-equal size (40
prompts at 32 are 20 + 20, not 32 + 8: a decoding step reads every weight whatever its batch,
so its cost is nearly flat in batch size on a CPU), left-padded with an attention mask, decoded with transformers'
``generate`` (a KV cache; positions from the mask, so a padded prompt sees the positions it
would see alone), each sequence stopping at its own end-of-sequence token or after
``max_new_tokens``; answers come back in the prompts' order. Greedy answers are the tokens of
one-prompt-at-a-time greedy decoding (tests/model/test_generate.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fedtune.data.prompts import render_prompt
from fedtune.reporting.progress import GENERATION, Progress

DEFAULT_BATCH_SIZE = 32


def render_prompts(tokenizer, prompts: Sequence[str], inputs: Sequence[str] | None, template: str) -> list[str]:
    """The prompt texts as training formats them (what the answers cache is keyed on, too)."""
    inputs = list(inputs) if inputs is not None else [""] * len(prompts)
    return [render_prompt(tokenizer, template, p, i) for p, i in zip(prompts, inputs)]


@torch.inference_mode()
def generate_ids(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    add_special_tokens: bool,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: Optional[Progress] = None,
    phase: str = GENERATION,
) -> list[list[int]]:
    """The new tokens of each rendered prompt in ``texts`` (in their order), up to and not
    including the first end-of-sequence token; ``progress`` sees ``phase`` advanced per prompt."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right; no gradients, so left padding is safe
    device = next(model.parameters()).device
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    stop = _eos_ids(model, tokenizer)
    out: dict[int, list[int]] = {}
    try:
        with (progress or Progress()).phase(phase, len(texts)) as shown:
            for start, stop_at in batch_bounds(len(order), batch_size):
                chunk = order[start:stop_at]
                batch = tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt").to(device)  # (b, t) left-padded
                kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
                if temperature > 0:
                    kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed + start)  # sampling is reproducible and leaves the caller's RNG alone
                    gen = model.generate(**batch, **kwargs)  # (b, t_prompt + t_new)
                for i, row in zip(chunk, gen[:, batch["input_ids"].shape[1] :].tolist()):
                    out[i] = _until_eos(row, stop)
                shown.advance(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [out[i] for i in range(len(texts))]


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the fewest batches of at most ``batch_size`` covering ``n`` items,
    their sizes differing by at most one (the larger first)."""
    count = -(-n // batch_size)
    bounds, start = [], 0
    for k in range(count):
        size = n // count + (k < n % count)
        bounds.append((start, start + size))
        start += size
    return bounds


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    template: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    inputs: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: Optional[Progress] = None,
    phase: str = GENERATION,
) -> list[str]:
    """Greedy (temperature 0) or sampled answers, one per prompt, formatted as in training;
    ``progress`` sees a phase named ``phase`` advanced per answered prompt."""
    texts = render_prompts(tokenizer, prompts, inputs, template)
    new = generate_ids(model, tokenizer, texts, add_special_tokens=(template == "alpaca"), max_new_tokens=max_new_tokens,
                       temperature=temperature, batch_size=batch_size, seed=seed, progress=progress, phase=phase)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """``tokens`` up to the first end-of-sequence token (what follows it is padding)."""
    for k, t in enumerate(tokens):
        if t in eos:
            return tokens[:k]
    return tokens
