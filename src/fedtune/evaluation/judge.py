"""A client for an OpenAI-compatible chat-completions endpoint, used as an LLM judge.

Any server that speaks ``POST {base_url}/chat/completions`` works: OpenAI, vLLM, llama.cpp,
Ollama, or ``fedtune serve`` (one fedtune model judging another). The client:

* sends ``Authorization: Bearer $KEY`` when the environment variable named by
  ``eval.judge.api_key_env`` is set (local servers need none);
* keeps to a rate limit: request starts are at least ``1 / requests_per_second`` apart;
* retries connection errors, timeouts, HTTP 429 and 5xx up to ``max_retries`` times with
  exponential backoff (``backoff * 2**attempt`` seconds, or the server's ``Retry-After`` when
  longer), then raises a one-line :class:`~fedtune.errors.JudgeError`; other HTTP errors
  (401, 404, 400 ...) are not retried;
* caches every reply on disk, keyed by (model, SHA-256 of the request: messages, max_tokens,
  temperature): judging the same answers again costs nothing, and an interrupted comparison
  picks up where it stopped. One JSON file per judgement, written atomically.

Uses only the standard library (``urllib``). Not thread-safe: one client per thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from fedtune.errors import JudgeError

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 60.0  # seconds: a longer Retry-After is capped


def cache_key(model: str, messages: list[dict], max_tokens: int, temperature: float) -> str:
    request = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    digest = hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"{_safe(model)}/{digest}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "model"


class JudgeClient:
    """Chat completions with retries, a rate limit and an on-disk cache (see module doc)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: Optional[str] = None,
        api_key_env: str = "OPENAI_API_KEY",
        requests_per_second: float = 2.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 120.0,
        max_tokens: int = 512,
        temperature: float = 0.0,
        cache_dir: Optional[Path] = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.api_key_env = model, api_key, api_key_env
        self.interval = 1.0 / requests_per_second
        self.max_retries, self.backoff, self.timeout = max_retries, backoff, timeout
        self.max_tokens, self.temperature = max_tokens, temperature
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.sleep, self.clock = sleep, clock
        self.next_start = 0.0
        self.stats = {"requests": 0, "cached": 0, "retries": 0}

    def complete(self, messages: list[dict]) -> str:
        """The judge's reply to ``messages`` (from the cache when this exact request was made before)."""
        key = cache_key(self.model, messages, self.max_tokens, self.temperature)
        cached = self._cache_get(key)
        if cached is not None:
            self.stats["cached"] += 1
            return cached
        text = self._request(messages)
        self._cache_put(key, messages, text)
        return text

    # ------------------------------------------------------------------------- transport

    def _request(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
            self._wait_turn()
            self.stats["requests"] += 1
            try:
                return self._post(body)
            except _Retry as retry:
                last = retry.reason
                delay = max(self.backoff * 2**attempt, min(retry.after or 0.0, MAX_RETRY_AFTER))
            if attempt < self.max_retries:
                log.info("judge request failed (%s); retrying in %.1fs", last, delay)
                self.sleep(delay)
        raise JudgeError(
            f"judge endpoint {self.url} failed after {self.max_retries + 1} attempts ({last}); "
            "start the server or fix eval.judge.base_url"
        )

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            message = _error_message(err.read())
            if err.code in RETRY_STATUS:
                raise _Retry(f"HTTP {err.code}: {message}", _retry_after(err.headers.get("Retry-After"))) from None
            hint = {401: f"set the API key in ${self.api_key_env} (eval.judge.api_key_env)",
                    403: "check the API key's permissions", 404: "check eval.judge.base_url and eval.judge.model"}
            raise JudgeError(f"judge endpoint {self.url} answered HTTP {err.code} ({message}); "
                             f"{hint.get(err.code, 'check eval.judge.*')}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as err:
            raise _Retry(f"cannot reach it: {getattr(err, 'reason', err)}") from None
        return _reply_text(payload, self.url)

    def _wait_turn(self) -> None:
        now = self.clock()
        if now < self.next_start:
            self.sleep(self.next_start - now)
            now = self.next_start
        self.next_start = now + self.interval

    # ------------------------------------------------------------------------- cache

    def _cache_path(self, key: str) -> Optional[Path]:
        return self.cache_dir / f"{key}.json" if self.cache_dir is not None else None

    def _cache_get(self, key: str) -> Optional[str]:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["reply"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None  # a damaged entry is asked again and rewritten

    def _cache_put(self, key: str, messages: list[dict], text: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        record = {"model": self.model, "prompt_sha256": key.rsplit("/", 1)[1], "messages": messages, "reply": text}
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)


class _Retry(Exception):
    def __init__(self, reason: str, after: Optional[float] = None):
        super().__init__(reason)
        self.reason, self.after = reason, after


def _retry_after(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw)["error"]
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace").strip() or "no message"


def _reply_text(payload: bytes, url: str) -> str:
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeError(f"judge endpoint {url} did not answer an OpenAI chat completion; check eval.judge.base_url") from None
    return content if isinstance(content, str) else ""


def build_judge(base_url: str, model: str, *, api_key_env: str, cache_dir: Optional[str], **settings) -> JudgeClient:
    """A judge client from config values; the API key comes from ``$api_key_env`` (may be unset)."""
    from fedtune.model.base import cache_root

    cache = Path(cache_dir).expanduser() if cache_dir else cache_root() / "judge"
    return JudgeClient(
        base_url, model, api_key=os.environ.get(api_key_env) or None, api_key_env=api_key_env, cache_dir=cache, **settings
    )
