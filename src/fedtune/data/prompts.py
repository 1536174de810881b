"""Prompt templates and tokenisation with loss on response tokens only.

Two formats: the Stanford Alpaca template (with and without an input section) and the
model's own chat template (the instruction, plus the input after a blank line, as the user
turn). Each example becomes ``prompt_ids + response_ids``; the loss covers the response
(including its end-of-turn token, so the model learns to stop) and never the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fedtune.errors import ModelError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def user_message(instruction: str, input: str = "") -> str:
    return f"{instruction}\n\n{input}" if input else instruction


def render_prompt(tokenizer, template: str, instruction: str, input: str = "") -> str:
    """The text a model sees before its answer."""
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT).format(instruction=instruction, input=input)
    return _chat(tokenizer, [{"role": "user", "content": user_message(instruction, input)}], generation_prompt=True)


def render_example(tokenizer, template: str, instruction: str, input: str, output: str) -> tuple[str, str]:
    """(prompt text, response text) for training; the response ends with the end-of-turn token."""
    if template == "alpaca":
        return render_prompt(tokenizer, template, instruction, input), output + (tokenizer.eos_token or "")
    return render_conversation(tokenizer, [{"role": "user", "content": user_message(instruction, input)}], output)


def render_conversation(tokenizer, messages: list[dict], answer: str) -> tuple[str, str]:
    """(prompt text, answer text) of a chat conversation (``messages`` ending with the user's
    turn) and the assistant's ``answer``, in the model's chat template; the answer text ends
    with the end-of-turn token."""
    prompt = _chat(tokenizer, messages, generation_prompt=True)
    full = _chat(tokenizer, messages + [{"role": "assistant", "content": answer}], generation_prompt=False)
    if not full.startswith(prompt):  # a template that rewrites earlier turns; fall back to plain concat
        return prompt, answer + (tokenizer.eos_token or "")
    return prompt, full[len(prompt) :]


def _chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat template; "
            "set data.template=alpaca"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@dataclass
class Encoded:
    """Token ids of one example and where its response starts."""

    input_ids: torch.Tensor  # (t,) int64
    prompt_len: int  # tokens before the response; their labels are -100

    @property
    def response_tokens(self) -> int:
        return int(self.input_ids.numel()) - self.prompt_len


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int, template: str) -> list[Encoded]:
    """Tokenise (prompt, response) text pairs, truncating each sequence to ``max_length``.

    Prompt and response are tokenised separately so the boundary is exact. Rendered chat
    text already holds its special tokens; the Alpaca prompt gets the tokenizer's own (BOS).
    """
    if not pairs:
        return []
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=(template == "alpaca"))["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(prompts, responses):
        ids = (list(p) + list(r))[:max_length]
        out.append(Encoded(torch.tensor(ids, dtype=torch.long), min(len(p), len(ids))))
    return out


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Labels are -100 on prompt and padding tokens.

    Padding goes on the right: with left padding, fully masked query rows make SDPA attention
    on CPU give exploding gradients (see DESIGN.md).
    """
    width = max(int(e.input_ids.numel()) for e in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (b, t)
    attention = torch.zeros((len(items), width), dtype=torch.long)  # (b, t)
    labels = torch.full((len(items), width), -100, dtype=torch.long)  # (b, t)
    for row, e in enumerate(items):
        n = int(e.input_ids.numel())
        input_ids[row, :n] = e.input_ids
        attention[row, :n] = 1
        labels[row, e.prompt_len : n] = e.input_ids[e.prompt_len :]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A :func:`collate`/:func:`pack` batch on ``device``, but for a packed batch's ``segments``,
    which stay on the CPU: per-example attention splits the row at them in Python, once per
    layer (model/attention.py), and reading them from a GPU makes the host wait for the GPU
    there (``tolist()``: 30 waits per forward of SmolLM2)."""
    return {k: v if k == "segments" else v.to(device, non_blocking=True) for k, v in batch.items()}


def pack(items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
    """All ``items`` in one row with no padding: input ids and labels (1, t) as from
    :func:`collate`, positions restarting at 0 for each example (1, t), and the examples'
    lengths (k,) for per-example attention (model/attention.py). The first token of every
    example is unlabelled, so no position predicts across a boundary."""
    input_ids = torch.cat([e.input_ids for e in items]).unsqueeze(0)  # (1, t)
    labels = torch.cat([
        torch.cat([torch.full((max(e.prompt_len, 1),), -100, dtype=torch.long), e.input_ids[max(e.prompt_len, 1) :]])
        for e in items
    ]).unsqueeze(0)  # (1, t)
    position_ids = torch.cat([torch.arange(int(e.input_ids.numel())) for e in items]).unsqueeze(0)  # (1, t)
    segments = torch.tensor([int(e.input_ids.numel()) for e in items])  # (k,)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segments": segments}
