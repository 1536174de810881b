"""Answer prompts with the model as it stands (base, or with an adapter loaded), or with several
adapters at once (model/row_adapters.py: each prompt answered by its own adapter).

Prompts are answered in batches of at most ``batch_size`` (``eval.generation_batch_size``):
sorted by length (little padding) and cut into the fewest batches of near-equal size (40
prompts at 32 are 20 + 20, not 32 + 8: a decoding step reads every weight whatever its batch,
so its cost is nearly flat in batch size on a CPU), decoded with transformers' ``generate``
(a KV cache; positions from the attention mask, so a padded prompt sees the positions it
would see alone), each sequence stopping at its own end-of-sequence token or after
``max_new_tokens``; answers come back in the prompts' order.

The tokens every prompt of a batch starts with (a chat template's system prompt, Alpaca's
preamble: 25-40 tokens, often more than half of a short prompt) are run once per adapter
and their KV cache shared by the batch's rows: each row is laid out as [shared prefix]
[padding][rest of its prompt], the padding masked out, so every real token keeps its
position and sees what it would see alone; only the rests are prefilled. Greedy answers are
the tokens of one-prompt-at-a-time greedy decoding (tests/model/test_generate.py).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch

from fedtune.data.prompts import render_prompt
from fedtune.model.attention import kv_cache
from fedtune.reporting.progress import GENERATION, Progress

DEFAULT_BATCH_SIZE = 32
SHARED_PREFIX_MIN = 4  # tokens a batch's prompts must share before their prefix is run once
Route = Callable[[Sequence[int]], ContextManager]  # row groups -> a context in which row i uses group i's adapter


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
    groups: Optional[Sequence[int]] = None,
    route: Optional[Route] = None,
) -> list[list[int]]:
    """The new tokens of each rendered prompt in ``texts`` (in their order), up to and not
    including the first end-of-sequence token; ``progress`` sees ``phase`` advanced per prompt.
    With ``groups`` and ``route`` (model/row_adapters.py), prompt i is answered by the adapter
    of group ``groups[i]``, prompts of every group sharing batches."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right; no gradients, so left padding is safe
    device = next(model.parameters()).device
    groups = list(groups) if groups is not None else [0] * len(texts)
    route = route or (lambda _: contextlib.nullcontext())
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    stop = _eos_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out: dict[int, list[int]] = {}
    share = [True]  # off for the rest of the call once the model's cache turns out not to be a plain one
    try:
        with (progress or Progress()).phase(phase, len(texts)) as shown:
            for start, stop_at in batch_bounds(len(order), batch_size):
                chunk = order[start:stop_at]
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed + start)  # sampling is reproducible and leaves the caller's RNG alone
                    new = _decode(model, tokenizer, [ids[i] for i in chunk], [groups[i] for i in chunk], route, device, kwargs, share)
                for i, row in zip(chunk, new):
                    out[i] = _until_eos(row, stop)
                shown.advance(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [out[i] for i in range(len(texts))]


def _decode(model, tokenizer, rows: list[list[int]], groups: list[int], route: Route, device, kwargs: dict,
            share: list[bool]) -> list[list[int]]:
    """The generated tokens of one batch of tokenised prompts (module doc: the shared prefix;
    ``share[0]`` is cleared when the model's cache cannot hold one)."""
    shared = shared_prefix(rows) if len(rows) > 1 and share[0] else 0
    given = {}
    if shared >= SHARED_PREFIX_MIN:
        variants = sorted(set(groups))  # the prefix's keys and values depend on the adapter
        prefix = torch.tensor(rows[0][:shared], device=device)
        with route(variants):
            name, cache = kv_cache(model(input_ids=prefix.expand(len(variants), -1), use_cache=True, logits_to_keep=1))
        if cache is None:  # sliding windows, hybrid layers: every row prefilled whole, in this batch and the next
            shared, share[0] = 0, False
        else:
            cache.reorder_cache(torch.tensor([variants.index(g) for g in groups], device=device))
            given = {name: cache}
    rest = tokenizer.pad({"input_ids": [r[shared:] for r in rows]}, return_tensors="pt").to(device)  # (b, t) left-padded
    input_ids, mask = rest["input_ids"], rest["attention_mask"]
    if shared:
        input_ids = torch.cat([prefix.expand(len(rows), -1), input_ids], 1)
        mask = torch.cat([torch.ones(len(rows), shared, dtype=mask.dtype, device=device), mask], 1)
    with route(groups):
        gen = model.generate(input_ids=input_ids, attention_mask=mask, **given, **kwargs)  # (b, t_prompt + t_new)
    return gen[:, input_ids.shape[1]:].tolist()


def shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``rows`` share, leaving every row at least one of its own."""
    first, limit = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


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
    groups: Optional[Sequence[int]] = None,
    route: Optional[Route] = None,
) -> list[str]:
    """Greedy (temperature 0) or sampled answers, one per prompt, formatted as in training;
    ``progress`` sees a phase named ``phase`` advanced per answered prompt (``groups`` and
    ``route``: as in :func:`generate_ids`)."""
    texts = render_prompts(tokenizer, prompts, inputs, template)
    new = generate_ids(model, tokenizer, texts, add_special_tokens=(template == "alpaca"), max_new_tokens=max_new_tokens,
                       temperature=temperature, batch_size=batch_size, seed=seed, progress=progress, phase=phase,
                       groups=groups, route=route)
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
