"""Preference data: (prompt, chosen answer, rejected answer) records, validated with row numbers.

Each record becomes a :class:`PreferencePair`: the conversation before the answers (one or
more turns, ending with a user turn) and the two final answers. The layout is read from the
values themselves, so one loader takes the common public formats:

* pairs: ``prompt`` / ``chosen`` / ``rejected`` strings (the prompt may itself be an
  Anthropic dialogue ending in ``\\n\\nAssistant:``);
* Anthropic HH-RLHF: no prompt, ``chosen`` and ``rejected`` are whole dialogues
  (``\\n\\nHuman: … \\n\\nAssistant: …``) that share every turn up to the answers;
* conversational (trl, UltraFeedback): values are lists of ``{"role", "content"}`` messages,
  with or without a separate prompt.

The answers start at the first turn where the two dialogues differ; that turn must be an
Assistant turn in both, and no Human turn may follow it, and the two answers must differ.
Anything else is a malformed record and fails the load with the file, the row and the reason.

Encoding renders the prompt once (the model's chat template, Human -> user and Assistant ->
assistant; or the Alpaca template over a transcript) and each answer after it, tokenised
separately so the prompt/answer boundary is exact, as for instruction data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

from fedtune.data.prompts import ALPACA_NO_INPUT, Encoded, collate, pack, render_conversation
from fedtune.data.sources import LoadReport, RowProblem, check_columns, check_mapped, collect, read_rows, text_value

Turn = tuple[str, str]  # (role, text); role is "user", "assistant" or "system"

# "\n\nHuman: " / "\n\nAssistant: " (or at the very start of the text) opens a turn.
_MARKER = re.compile(r"(?:^|\n\n)[ \t]*(Human|Assistant):[ \t]?")
_ROLES = {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_SPEAKER = {"user": "Human", "assistant": "Assistant", "system": "System"}


@dataclass(frozen=True)
class PreferencePair:
    """One preference: after ``prompt``, ``chosen`` is preferred to ``rejected``."""

    prompt: tuple[Turn, ...]  # the conversation so far; its last turn is the user's
    chosen: str
    rejected: str
    category: str


def parse_dialogue(text: str) -> Optional[list[Turn]]:
    """The turns of an Anthropic-style dialogue, or None if ``text`` is not one."""
    parts = _MARKER.split(text)  # [lead, speaker, text, speaker, text, ...]
    if len(parts) < 3 or parts[0].strip():
        return None
    return [(_ROLES[speaker.lower()], body.strip()) for speaker, body in zip(parts[1::2], parts[2::2])]


def transcript(turns: tuple[Turn, ...] | list[Turn]) -> str:
    """Turns written back as ``Human: …\\n\\nAssistant: …`` (a single user turn as its text)."""
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n\n".join(f"{_SPEAKER[role]}: {text}" for role, text in turns)


def _messages(value: list, field: str) -> list[Turn]:
    turns = []
    for i, m in enumerate(value):
        role = m.get("role", m.get("from")) if isinstance(m, dict) else None
        content = m.get("content", m.get("value")) if isinstance(m, dict) else None
        if not isinstance(role, str) or role.lower() not in _ROLES or not isinstance(content, str):
            raise RowProblem(f"field '{field}': message {i + 1} is not a {{role, content}} object with a known role")
        turns.append((_ROLES[role.lower()], content.strip()))
    return turns


def _turns(value: object, field: str, column: str) -> Union[list[Turn], str]:
    """A message list or dialogue as turns; plain text as a string."""
    if isinstance(value, list):
        return _messages(value, field)
    text = text_value(value, field, column)
    if text is None:
        raise RowProblem(f"field '{field}' (column '{column}') is missing")
    return parse_dialogue(text) or text.strip()


def split_pair(prompt: object, chosen: object, rejected: object, columns: dict[str, str]) -> tuple[tuple[Turn, ...], str, str]:
    """(prompt turns, chosen answer, rejected answer) of one record; raises RowProblem."""
    c, r = _turns(chosen, "chosen", columns["chosen"]), _turns(rejected, "rejected", columns["rejected"])
    p: Optional[list[Turn]] = None
    if prompt if isinstance(prompt, list) else (text_value(prompt, "prompt", columns["prompt"]) or "").strip():
        p = _turns(prompt, "prompt", columns["prompt"])
        p = [("user", p)] if isinstance(p, str) else p
        if p and p[-1] == ("assistant", ""):  # "\n\nHuman: q\n\nAssistant:" leaves an empty answer turn
            p = p[:-1]
    elif isinstance(c, str) and isinstance(r, str):
        raise RowProblem(
            f"field 'prompt' (column '{columns['prompt']}') is missing or empty, and 'chosen' is not a "
            "Human/Assistant dialogue"
        )
    c = [("assistant", c)] if isinstance(c, str) else c
    r = [("assistant", r)] if isinstance(r, str) else r
    if p:
        c = c if c[: len(p)] == p else p + c
        r = r if r[: len(p)] == p else p + r
    return _answers(c, r)


def _answers(c: list[Turn], r: list[Turn]) -> tuple[tuple[Turn, ...], str, str]:
    shortest = min(len(c), len(r))
    k = next((i for i in range(shortest) if c[i] != r[i]), shortest - 1)
    k = min(k, shortest - 1)
    if c[k][0] != "assistant" or r[k][0] != "assistant":
        raise RowProblem(
            f"'chosen' and 'rejected' differ at turn {k + 1}, which is not an Assistant turn in both; "
            "they must share the conversation up to the answers"
        )
    for name, turns in (("chosen", c), ("rejected", r)):
        if any(role == "user" for role, _ in turns[k:]):
            raise RowProblem(f"'{name}' goes on with a Human turn after its answer (turn {k + 1}); one answer per record")
    prompt = tuple(c[:k])
    if not prompt or prompt[-1][0] != "user":
        raise RowProblem("the conversation before the answers must end with a Human (user) turn")
    chosen, rejected = _answer_text(c[k:]), _answer_text(r[k:])
    if chosen == rejected:
        raise RowProblem("'chosen' and 'rejected' are the same answer; a preference needs two different answers")
    return prompt, chosen, rejected


def _answer_text(turns: list[Turn]) -> str:
    """The answer: the diverging turn, plus any further Assistant turns as the record wrote them."""
    return turns[0][1] + "".join(f"\n\nAssistant: {text}" for _, text in turns[1:])


def load_preferences(
    path: str,
    columns: dict[str, str],
    *,
    split: str = "train",
    subset: Optional[str] = None,
    skip_invalid: bool = False,
    limit: Optional[int] = None,
) -> tuple[list[PreferencePair], LoadReport]:
    """Load and validate preference records.

    Args:
        columns: source column for each of ``chosen``, ``rejected`` (required), ``prompt``
            (needed unless the answers are whole dialogues) and ``category`` (optional).
        skip_invalid: skip malformed rows (counted in the report) instead of failing.
        limit: keep only the first ``limit`` valid rows.

    Raises:
        DataError: naming the file, the row and the problem (a malformed dialogue, a field
            holding an object or true/false instead of text, two identical answers), unless
            ``skip_invalid``.
    """
    source, rows = read_rows(path, split, subset)
    seen: set[str] = set()

    def parse(row: dict, first: bool) -> PreferencePair:
        if first:
            check_columns(source, row, columns, ("chosen", "rejected"))
        seen.update(row)
        prompt, chosen, rejected = split_pair(row.get(columns["prompt"]), row.get(columns["chosen"]), row.get(columns["rejected"]), columns)
        category = (text_value(row.get(columns["category"]), "category", columns["category"]) or "").strip() or "all"
        return PreferencePair(prompt, chosen, rejected, category)

    pairs, report = collect(source, rows, parse, skip_invalid=skip_invalid, limit=limit)
    check_mapped(source, seen, columns, ("prompt", "category"))
    return pairs, report


# ----------------------------------------------------------------------------- encoding


@dataclass
class EncodedPair:
    """Token ids of prompt + chosen and prompt + rejected (the same prompt tokens in both)."""

    chosen: Encoded
    rejected: Encoded

    @property
    def length(self) -> int:
        """Tokens of both sequences: what a pair costs in a batch."""
        return int(self.chosen.input_ids.numel() + self.rejected.input_ids.numel())

    @property
    def padded_length(self) -> int:
        """What a pair costs a batch padded to it: two rows of its longer sequence."""
        return 2 * int(max(self.chosen.input_ids.numel(), self.rejected.input_ids.numel()))

    @property
    def response_tokens(self) -> int:
        """Tokens of the shorter answer (0 if truncation left an answer empty)."""
        return min(self.chosen.response_tokens, self.rejected.response_tokens)


def render_pair(tokenizer, template: str, pair: PreferencePair) -> tuple[str, str, str]:
    """(prompt text, chosen text, rejected text); each answer ends with the end-of-turn token."""
    if template == "alpaca":
        eos = tokenizer.eos_token or ""
        return ALPACA_NO_INPUT.format(instruction=transcript(pair.prompt)), pair.chosen + eos, pair.rejected + eos
    messages = [{"role": role, "content": text} for role, text in pair.prompt]
    prompt, chosen = render_conversation(tokenizer, messages, pair.chosen)
    _, rejected = render_conversation(tokenizer, messages, pair.rejected)
    return prompt, chosen, rejected


def fit_length(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int) -> tuple[list[int], list[int], list[int]]:
    """Cut prompt + answer to ``max_length`` tokens while keeping the answers, where the
    preference lies: the prompt loses its oldest tokens first (down to ``max_length // 2``),
    then the answers lose their last ones."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length:
        keep = max(max_length - longest, min(len(prompt), max_length // 2))
        prompt = prompt[len(prompt) - keep :]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def encode_preferences(tokenizer, pairs: list[PreferencePair], template: str, max_length: int) -> list[EncodedPair]:
    """Tokenise preference pairs, at most ``max_length`` tokens per sequence (see :func:`fit_length`)."""
    if not pairs:
        return []
    rendered = [render_pair(tokenizer, template, pair) for pair in pairs]
    prompts = tokenizer([p for p, _, _ in rendered], add_special_tokens=(template == "alpaca"))["input_ids"]
    chosen = tokenizer([c for _, c, _ in rendered], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([r for _, _, r in rendered], add_special_tokens=False)["input_ids"]
    out = []
    for p, c, r in zip(prompts, chosen, rejected):
        p, c, r = fit_length(list(p), list(c), list(r), max_length)
        out.append(EncodedPair(Encoded(torch.tensor(p + c, dtype=torch.long), len(p)), Encoded(torch.tensor(p + r, dtype=torch.long), len(p))))
    return out


def collate_pairs(items: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2b rows: the b chosen sequences, then the b rejected ones."""
    return collate([i.chosen for i in items] + [i.rejected for i in items], pad_id)


def pack_pairs(items: list[EncodedPair]) -> dict[str, torch.Tensor]:
    """The same 2b sequences packed into one row (``prompts.pack``): no padding."""
    return pack([i.chosen for i in items] + [i.rejected for i in items])
