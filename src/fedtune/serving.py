"""An OpenAI-compatible HTTP server for a run's adapter on its base model.

Endpoints (the subset of the OpenAI API that chat clients and judges use):

* ``GET /v1/models`` and ``GET /v1/models/{id}`` — the one served model.
* ``POST /v1/chat/completions`` — ``messages`` (system/user/assistant, content as a string or
  a list of text parts), ``max_tokens`` (or ``max_completion_tokens``), ``temperature``
  (0 = greedy), ``top_p``, ``seed``, ``stop``, ``n`` (1 only) and ``stream`` (server-sent
  events, ending with ``data: [DONE]``). Other OpenAI fields are accepted and ignored.

Malformed requests get HTTP 400 with ``{"error": {"message", "type", "param", "code"}}``;
an unknown model 404. The model is loaded once; requests are served by threads and generate
one at a time (a lock), so ``/v1/models`` answers while a completion runs. Messages are
rendered with the model's chat template (``data.template=chat``) or, for ``alpaca`` runs, the
last user message goes through the Alpaca prompt the adapter was trained with.
Built on the standard library (``http.server``): no extra dependency.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

import torch

from fedtune.data.prompts import render_prompt

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
MAX_BODY = 4 << 20  # bytes
ROLES = ("system", "developer", "user", "assistant")


class RequestError(Exception):
    """A request the server refuses: HTTP status, message and the offending parameter."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"'{key}' must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default: int, low: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(400, f"'{key}' must be an integer >= {low}, got {value!r}", key)
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


def parse_request(raw: bytes, served: str) -> ChatRequest:
    """Validate a chat-completions body; raise RequestError (400/404) naming the field."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served:
        raise RequestError(404, f"model '{model}' not found; this server serves '{served}'", "model", "not_found_error")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    parsed = [_message(i, m) for i, m in enumerate(messages)]
    if not any(m["role"] == "user" for m in parsed):
        raise RequestError(400, "'messages' needs at least one user message", "messages")
    if _integer(body, "n", 1, 1) != 1:
        raise RequestError(400, "only n=1 is supported", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    tokens_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return ChatRequest(
        messages=parsed,
        max_tokens=_integer(body, tokens_key, DEFAULT_MAX_TOKENS, 1),
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        seed=_integer(body, "seed", 0, 0),
        stop=stop,
        stream=body.get("stream", False),
    )


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one was found."""
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class ChatModel:
    """The served model: renders messages, generates one request at a time."""

    def __init__(self, model, tokenizer, *, template: str, name: str, max_context: Optional[int] = None):
        self.model, self.tokenizer, self.template, self.name = model, tokenizer, template, name
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", 2048)
        self.lock = threading.Lock()
        self.created = int(time.time())

    def prompt_ids(self, messages: list[dict]) -> torch.Tensor:
        if self.template == "chat":
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            last = next(m["content"] for m in reversed(messages) if m["role"] == "user")
            ids = self.tokenizer(render_prompt(self.tokenizer, "alpaca", last), return_tensors="pt")["input_ids"]
        if ids.shape[1] + 1 > self.max_context:
            raise RequestError(400, f"the prompt has {ids.shape[1]} tokens; this model's context is {self.max_context}", "messages")
        return ids  # (1, t)

    def _kwargs(self, req: ChatRequest, ids: torch.Tensor) -> dict:
        device = next(self.model.parameters()).device
        kwargs = dict(
            input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), pad_token_id=self.tokenizer.pad_token_id,
            max_new_tokens=min(req.max_tokens, self.max_context - ids.shape[1]),
        )
        if req.temperature > 0:
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.stop:  # end generation at a stop string (the text is cut before it afterwards)
            kwargs.update(stop_strings=req.stop, tokenizer=self.tokenizer)
        return kwargs

    @contextlib.contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """Sampling draws from ``seed`` without touching the process's RNG state."""
        device = next(self.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    @torch.inference_mode()
    def complete(self, req: ChatRequest) -> dict:
        """{"text", "prompt_tokens", "completion_tokens", "finish_reason"}"""
        ids = self.prompt_ids(req.messages)
        kwargs = self._kwargs(req, ids)
        with self.lock, self._seeded(req.seed):
            self.model.eval()
            new = self.model.generate(**kwargs)[0, ids.shape[1]:]  # (t_new,)
        text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), req.stop)
        return {"text": text.strip(), "prompt_tokens": int(ids.shape[1]), "completion_tokens": int(len(new)),
                "finish_reason": self._finish(new, kwargs["max_new_tokens"], stopped)}

    def _finish(self, new: torch.Tensor, max_new: int, stopped: bool) -> str:
        """"length" when generation ran out of tokens, else "stop" (end of turn or a stop string)."""
        ended = stopped or len(new) < max_new or (len(new) > 0 and int(new[-1]) in self._eos_ids())
        return "stop" if ended else "length"

    def stream(self, req: ChatRequest) -> Iterator[tuple[str, Optional[str]]]:
        """(text piece, None) as tokens arrive, then ("", finish_reason)."""
        from transformers import TextIteratorStreamer

        ids = self.prompt_ids(req.messages)
        kwargs = self._kwargs(req, ids)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        hold = max((len(s) for s in req.stop), default=1) - 1  # keep back what may start a stop string
        result: dict = {}
        with self.lock:
            worker = threading.Thread(target=self._generate_into, args=(kwargs, req.seed, streamer, result), daemon=True)
            worker.start()
            text, sent = "", 0
            for piece in streamer:
                text += piece
                cut, stopped = cut_at_stop(text, req.stop)
                if stopped:
                    yield cut[sent:], None
                    worker.join()
                    yield "", "stop"
                    return
                if len(text) - hold > sent:
                    yield text[sent : len(text) - hold], None
                    sent = len(text) - hold
            worker.join()
        if "error" in result:
            raise result["error"]
        yield text[sent:], None
        new = result.get("new", torch.zeros(0, dtype=torch.long))
        yield "", self._finish(new, kwargs["max_new_tokens"], False)

    @torch.inference_mode()
    def _generate_into(self, kwargs: dict, seed: int, streamer, result: dict) -> None:
        try:
            with self._seeded(seed):
                self.model.eval()
                result["new"] = self.model.generate(**kwargs, streamer=streamer)[0, kwargs["input_ids"].shape[1] :].cpu()
        except Exception as err:  # end the stream; the request thread reports it
            result["error"] = err
            streamer.end()

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        return {int(e) for e in eos + [self.tokenizer.eos_token_id] if e is not None}


class Handler(BaseHTTPRequestHandler):
    server: "ChatServer"
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends when the connection closes

    def log_message(self, format: str, *args: Any) -> None:  # the library is quiet: route to logging
        log.info("%s %s", self.address_string(), format % args)

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _model_card(self) -> dict:
        chat = self.server.chat
        return {"id": chat.name, "object": "model", "created": chat.created, "owned_by": "fedtune"}

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith(("/v1/models/", "/models/")) and path.rsplit("/", 1)[1] == self.server.chat.name:
            self._json(200, self._model_card())
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, RequestError(404, f"no such endpoint: GET {path}", kind="not_found_error").body())

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path not in ("/v1/chat/completions", "/chat/completions"):
                raise RequestError(404, f"no such endpoint: POST {path}", kind="not_found_error")
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                raise RequestError(400, f"request body must be 1 byte to {MAX_BODY} bytes of JSON, got {length}")
            req = parse_request(self.rfile.read(length), self.server.chat.name)
            if req.stream:
                self._stream(req)
            else:
                self._json(200, self._completion(req))
        except RequestError as err:
            self._json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError):
            log.info("client closed the connection")
        except Exception as err:  # a bug or an out-of-memory: answer 500 and keep serving
            log.exception("chat completion failed")
            self._json(500, RequestError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").body())

    def _completion(self, req: ChatRequest) -> dict:
        out = self.server.chat.complete(req)
        self.server.count += 1
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.server.chat.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": out["finish_reason"]}],
            "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                      "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
        }

    def _stream(self, req: ChatRequest) -> None:
        self.server.chat.prompt_ids(req.messages)  # a too-long prompt is a 400 before the stream starts
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.server.chat.name}

        def send(delta: dict, finish: Optional[str]) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        send({"role": "assistant", "content": ""}, None)
        try:
            for piece, finish in self.server.chat.stream(req):
                if piece:
                    send({"content": piece}, None)
                if finish:
                    send({}, finish)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as err:  # headers are sent: report the failure as an error event
            log.exception("streamed chat completion failed")
            error = RequestError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").body()
            self.wfile.write(f"data: {json.dumps(error)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.server.count += 1


class ChatServer(ThreadingHTTPServer):
    """The HTTP server. It binds at construction (so a busy port fails before a model is
    loaded); ``chat`` may be set afterwards, before ``serve_forever``."""

    daemon_threads = True

    def __init__(self, chat: Optional[ChatModel], host: str = "127.0.0.1", port: int = 8000):
        self.chat, self.count = chat, 0  # count: completions served
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def load_chat_model(run_dir, *, base: bool = False, name: Optional[str] = None) -> ChatModel:
    """The served model of a run directory: its final adapter (else its newest checkpoint) on
    its base model, or with ``base`` the base model alone (a zero adapter: LoRA adds exactly 0)."""
    from pathlib import Path

    from fedtune.federation.setup import load_run_model
    from fedtune.model.lora import get_adapter, set_adapter, zeros_like

    run_dir = Path(run_dir)
    cfg, bundle, _ = load_run_model(run_dir)
    if base:
        set_adapter(bundle.params, zeros_like(get_adapter(bundle.params)))
    served = name or (f"{run_dir.resolve().name}-base" if base else run_dir.resolve().name)
    return ChatModel(bundle.model, bundle.tokenizer, template=cfg.data.template, name=served)
