"""The served model: prompt rendering and a token-by-token sampling loop.

The loop (rather than ``model.generate``) gives what a server needs per token: a check that
the client is still there (a dropped request stops within one token), text as it arrives, the
log-probabilities OpenAI's ``logprobs`` report, and sampling from a ``torch.Generator`` seeded
per request, so the same seed and prompt give the same completion whatever else runs. Sampling
uses only the request's ``temperature`` and ``top_p`` (not the model's generation_config).
One generation at a time: the caller holds the model (``serving.queue.ModelQueue``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch

from fedtune.data.prompts import render_prompt
from fedtune.serving.api import GenRequest, RequestError, cut_at_stop

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client closed its connection; the request is abandoned."""


@dataclass
class Token:
    text: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)  # the most likely tokens, best first


@dataclass
class Piece:
    text: str
    tokens: list[Token]  # with logprobs asked: the tokens this text came from


@dataclass
class Finish:
    reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else a draw from softmax(logits / T) restricted to the smallest
    set of most likely tokens whose mass reaches ``top_p`` (nucleus sampling). logits: (V,)"""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
    if top_p >= 1:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = torch.sort(probs, descending=True)  # (V,), (V,)
    keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p  # mass before a token < p: always keeps the first
    return int(order[torch.multinomial(sorted_probs * keep, 1, generator=generator)])


class ChatModel:
    """A model and tokenizer behind the server; ``generate`` yields Pieces then one Finish."""

    def __init__(self, model, tokenizer, *, template: str, name: str, max_context: Optional[int] = None):
        self.model, self.tokenizer, self.template, self.name = model, tokenizer, template, name
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", 2048)
        self.created = int(time.time())
        forward = inspect.signature(type(model).forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"  # transformers 5 renamed it
        self._tokenizer_lock = threading.Lock()  # a Rust tokenizer may refuse calls from two threads at once
        self.active = 0  # generations running now (0 or 1)
        self.tokens_generated = 0  # tokens sampled since start (tests and /health watch it)

    def prompt_ids(self, req: GenRequest) -> torch.Tensor:
        """The prompt's token ids (1, t); 400 when it leaves no room to answer."""
        with self._tokenizer_lock:
            ids = self._encode(req)
        if ids.shape[1] == 0 or ids.shape[1] + 1 > self.max_context:
            raise RequestError(400, f"the prompt has {ids.shape[1]} tokens; this model's context is {self.max_context}",
                               "messages" if req.chat else "prompt", code="context_length_exceeded")
        return ids

    def _encode(self, req: GenRequest) -> torch.Tensor:
        if req.prompt is not None:
            ids = self.tokenizer(req.prompt, return_tensors="pt")["input_ids"]
        elif self.template == "chat":
            text = self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            last = next(m["content"] for m in reversed(req.messages) if m["role"] == "user")
            ids = self.tokenizer(render_prompt(self.tokenizer, "alpaca", last), return_tensors="pt")["input_ids"]
        return ids  # (1, t)

    def generate(self, req: GenRequest, ids: torch.Tensor, cancelled: Callable[[], bool] = lambda: False
                 ) -> Iterator[Union[Piece, Finish]]:
        """Text as it becomes final (held back while it may begin a stop string), then a Finish.
        Raises ClientGone when ``cancelled()`` turns true between two tokens."""
        hold = max((len(s) for s in req.stop), default=1) - 1
        new: list[int] = []
        pending: list[tuple[int, Token]] = []  # (start in text, token) not yet sent
        text, sent, reason, count = "", 0, "length", 0
        with contextlib.closing(self._tokens(req, ids, cancelled)) as tokens:  # ends the loop (active -= 1) at once
            for tok, token in tokens:
                count += 1
                if token is None:  # end of turn
                    reason = "stop"
                    break
                start = len(text)
                new.append(tok)
                text = self._decode(new)
                if req.logprobs:
                    pending.append((start, token))
                text, stopped = cut_at_stop(text, req.stop)
                if stopped:
                    reason = "stop"
                    break
                end = len(text) - hold - (1 if text.endswith("\ufffd") else 0)  # a partial UTF-8 character waits too
                if end > sent:
                    yield Piece(text[sent:end], _take(pending, end))
                    sent = end
        yield Piece(text[sent:], _take(pending, len(text)))
        yield Finish(reason, int(ids.shape[1]), count)

    @torch.inference_mode()
    def _tokens(self, req: GenRequest, ids: torch.Tensor, cancelled: Callable[[], bool]
                ) -> Iterator[tuple[int, Optional[Token]]]:
        """(token id, Token) per sampled token; (eos id, None) at the end of turn."""
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(req.seed)
        eos = self._eos_ids()
        max_new = min(req.max_tokens, self.max_context - ids.shape[1])
        self.model.eval()
        inputs, past = ids.to(device), None
        self.active += 1
        try:
            for _ in range(max_new):
                if cancelled():
                    raise ClientGone()
                out = self.model(input_ids=inputs, use_cache=True, logits_to_keep=1, **{self._cache_arg: past})
                past, logits = getattr(out, self._cache_arg), out.logits[0, -1].float()  # (V,)
                tok = pick_token(logits, req.temperature, req.top_p, generator)
                self.tokens_generated += 1
                if tok in eos:
                    yield tok, None
                    return
                yield tok, self._token(tok, logits, req) if req.logprobs else Token("", 0.0)
                inputs = torch.tensor([[tok]], device=device)
        finally:
            self.active -= 1

    def _token(self, tok: int, logits: torch.Tensor, req: GenRequest) -> Token:
        logp = torch.log_softmax(logits, dim=-1)  # (V,): the model's distribution, before temperature
        top = torch.topk(logp, req.top_logprobs) if req.top_logprobs else None
        pairs = [] if top is None else [(self._decode([int(i)], False), float(v)) for v, i in zip(top.values, top.indices)]
        return Token(self._decode([tok], False), float(logp[tok]), pairs)

    def _decode(self, ids: list[int], skip_special: bool = True) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        return {int(e) for e in eos + [self.tokenizer.eos_token_id] if e is not None}


def _take(pending: list[tuple[int, Token]], end: int) -> list[Token]:
    """Pop the tokens whose text starts before ``end``: they are sent with it (the rest wait or were cut by a stop)."""
    taken = [t for start, t in pending if start < end]
    del pending[: len(taken)]
    return taken


def load_chat_model(run_dir, *, base: bool = False, name: Optional[str] = None) -> ChatModel:
    """The served model of a run directory (its final adapter, else its newest checkpoint, on
    its base model), a PEFT adapter folder or a merged model folder (federation/loader.py);
    with ``base`` the base model alone (a zero adapter: LoRA adds exactly 0)."""
    from pathlib import Path

    from fedtune.federation.loader import load_any_model

    run_dir = Path(run_dir)
    loaded = load_any_model(run_dir)
    if base:
        loaded.drop_adapter()
    served = name or (f"{run_dir.resolve().name}-base" if base else run_dir.resolve().name)
    return ChatModel(loaded.model, loaded.tokenizer, template=loaded.template, name=served)
