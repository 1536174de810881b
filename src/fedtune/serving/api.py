"""The OpenAI wire format: request validation and response bodies. Pure functions, no model.

Every refusal is a :class:`RequestError` whose body has OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``, whatever the status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Optional

import json

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
ROLES = ("system", "developer", "user", "assistant")
MAX_TOP_LOGPROBS = 20  # chat completions (OpenAI's bound); legacy completions allow 5
DEFAULT_CHAT_TOKENS, DEFAULT_TEXT_TOKENS = 256, 16  # OpenAI's legacy default is 16

# status -> (type, code) of the error body when the raiser names none
_KINDS = {
    401: ("invalid_request_error", "invalid_api_key"), 404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"), 408: ("invalid_request_error", "request_timeout"),
    411: ("invalid_request_error", "length_required"), 413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"), 500: ("server_error", "internal_error"),
    501: ("invalid_request_error", "not_implemented"), 503: ("server_error", "service_unavailable"),
}


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, the offending parameter and extra headers."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        default_kind, default_code = _KINDS.get(status, ("invalid_request_error", "invalid_value" if status == 400 else None))
        self.status, self.message, self.param = status, message, param
        self.kind, self.headers = kind or default_kind, headers or {}
        self.code = code or default_code or HTTPStatus(status).phrase.lower().replace(" ", "_")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    """A validated chat (``messages``) or legacy text (``prompt``) completion request."""

    messages: Optional[list[dict]] = None
    prompt: Optional[str] = None
    max_tokens: int = DEFAULT_CHAT_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    include_usage: bool = False

    @property
    def chat(self) -> bool:
        return self.messages is not None


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"'{key}' must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default: int, low: int, high: Optional[int] = None) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(400, f"'{key}' must be an integer {bound}, got {value!r}", key)
    return value


def _message(i: int, m: Any) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise RequestError(400, f"messages[{i}] must be an object with 'role' one of {', '.join(ROLES)}", f"messages[{i}].role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
    return {"role": "system" if m["role"] == "developer" else m["role"], "content": content}


def _object(raw: bytes, served: str) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served:
        raise RequestError(404, f"model '{model}' not found; this server serves '{served}'", "model", code="model_not_found")
    if _integer(body, "n", 1, 1) != 1:
        raise RequestError(400, "only n=1 is supported", "n")
    return body


def _common(body: dict, max_tokens_limit: int, default_tokens: int) -> dict:
    """The sampling fields chat and text completions share."""
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    tokens_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return dict(
        max_tokens=_integer(body, tokens_key, min(default_tokens, max_tokens_limit), 1, max_tokens_limit),
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        seed=_integer(body, "seed", 0, 0, MAX_SEED),
        stop=stop, stream=body.get("stream", False), include_usage=bool(options.get("include_usage", False)),
    )


def parse_request(raw: bytes, served: str, max_tokens_limit: int = 1 << 20) -> GenRequest:
    """Validate a chat-completions body; raise RequestError (400/404) naming the field."""
    body = _object(raw, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    parsed = [_message(i, m) for i, m in enumerate(messages)]
    if not any(m["role"] == "user" for m in parsed):
        raise RequestError(400, "'messages' needs at least one user message", "messages")
    if not isinstance(body.get("logprobs", False) or False, bool):
        raise RequestError(400, "'logprobs' must be true or false", "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top and not body.get("logprobs"):
        raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return GenRequest(messages=parsed, logprobs=bool(body.get("logprobs")), top_logprobs=top,
                      **_common(body, max_tokens_limit, DEFAULT_CHAT_TOKENS))


def parse_completion(raw: bytes, served: str, max_tokens_limit: int = 1 << 20) -> GenRequest:
    """Validate a legacy ``/v1/completions`` body (one prompt string; ``logprobs`` an int 0..5)."""
    body = _object(raw, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "'prompt' must be a non-empty string (one prompt per request)", "prompt")
    if body.get("echo") or body.get("suffix") is not None or _integer(body, "best_of", 1, 1) != 1:
        raise RequestError(400, "'echo', 'suffix' and 'best_of' > 1 are not supported", "echo")
    top = body.get("logprobs")
    top = None if top is None else _integer(body, "logprobs", 0, 0, 5)
    return GenRequest(prompt=prompt, logprobs=top is not None, top_logprobs=top or 0,
                      **_common(body, max_tokens_limit, DEFAULT_TEXT_TOKENS))


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one was found."""
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokens: list) -> dict:
    """OpenAI's chat ``logprobs`` object for engine tokens (``text``, ``logprob``, ``top``)."""
    return {"content": [{**_entry(t.text, t.logprob), "top_logprobs": [_entry(s, lp) for s, lp in t.top]} for t in tokens],
            "refusal": None}


def text_logprobs(tokens: list, offset: int) -> dict:
    """The legacy completions ``logprobs`` object; ``offset``: characters of completion text before the first token."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}
