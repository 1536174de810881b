"""HTTP for the served model (standard library ``http.server``): routing, bounded body reads,
the API key, JSON errors for every status, and server-sent-event streams."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import select
import socket
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

from fedtune.errors import ConfigError
from fedtune.serving.api import GenRequest, RequestError, chat_logprobs, parse_completion, parse_request, text_logprobs, usage
from fedtune.serving.engine import ChatModel, ClientGone, Finish, Piece
from fedtune.serving.queue import LeftLine, ModelQueue, QueueFull

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20  # bytes
CHAT_PATHS, TEXT_PATHS = ("/v1/chat/completions", "/chat/completions"), ("/v1/completions", "/completions")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, port: int, api_key: Optional[str], max_waiting: int = 16, io_timeout: float = 10.0,
                 max_tokens_limit: Optional[int] = None) -> None:
    """Refuse settings the server must not start with (ConfigError, one line)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}; pick a free port such as 8000")
    if max_waiting < 0 or not io_timeout > 0 or (max_tokens_limit is not None and max_tokens_limit < 1):
        raise ConfigError(f"--max-queue must be >= 0 (got {max_waiting}), --timeout > 0 (got {io_timeout:g}) "
                          f"and --max-tokens-limit >= 1 (got {max_tokens_limit})")
    if api_key is not None and api_key != api_key.strip():
        raise ConfigError("--api-key (or FEDTUNE_API_KEY) starts or ends with whitespace; a key is one word (e.g. from `openssl rand -hex 16`)")
    if not (api_key or "").strip() and not is_loopback(host):
        raise ConfigError(f"--host {host} is reachable from other machines: set --api-key (or FEDTUNE_API_KEY) "
                          "so that only clients with the key are served, or listen on 127.0.0.1")


def peer_closed(sock: socket.socket) -> bool:
    """Whether the client has closed its end (its request is fully read, so readable means EOF or an error)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


class Handler(BaseHTTPRequestHandler):
    server: "ChatServer"
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends when the connection closes
    server_version = "fedtune"

    def setup(self) -> None:
        self.timeout = self.server.io_timeout  # reads of headers and body, and writes, give up after it
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # the library is quiet: route to logging
        log.info("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own refusals (malformed request line, oversized headers, unknown method) in JSON too."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._json(code, RequestError(code, message or HTTPStatus(code).phrase).body())

    def _json(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _serve(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        self._unread = bool(self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get("Transfer-Encoding"))
        self._streaming = False
        try:
            if self.command not in ("GET", "POST"):
                raise RequestError(405, f"method {self.command} is not allowed; use GET or POST", headers={"Allow": "GET, POST"})
            raw = self._body() if self.command == "POST" else b""
            self._authorize(path)
            self._get(path) if self.command == "GET" else self._post(path, raw)
        except RequestError as err:
            self._json(err.status, err.body(), err.headers)
            if self._unread:
                self._linger()
        except (ClientGone, LeftLine, OSError) as err:  # a reset, a broken pipe, a write that timed out
            log.info("client left (%s); its request is dropped", type(err).__name__)
        except Exception as err:  # a bug or an out-of-memory: answer 500 and keep serving
            log.exception("request failed")
            if not self._streaming:
                self._json(500, RequestError(500, f"internal error: {type(err).__name__}: {err}").body())

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "chunked bodies are not supported; send the JSON with a Content-Length header")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError(411, "a POST needs a Content-Length header")
        raw = raw.strip()
        if not (raw.isascii() and raw.isdigit()):
            raise RequestError(400, f"Content-Length must be a number of bytes, got {raw[:40]!r}")
        length = int(raw)
        if length == 0:
            raise RequestError(400, "the request body is empty; send a JSON object")
        if length > MAX_BODY:
            raise RequestError(413, f"the request body has {length} bytes; the limit is {MAX_BODY}")
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self._unread = False  # a stalled client: no lingering for it
            raise RequestError(408, f"the request body did not arrive within {self.server.io_timeout:g} s") from None
        if len(data) < length:
            raise RequestError(400, f"the body ended after {len(data)} of its {length} bytes")
        self._unread = False
        return data

    def _authorize(self, path: str) -> None:
        key = self.server.api_key
        if key is None or path == "/health":
            return
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})

    def _linger(self) -> None:
        """After an error sent before the body was read: half-close and discard what the client
        still sends (bounded), so that closing with unread data does not reset the reply away."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            for _ in range(MAX_BODY // 65536 + 1):
                if not self.connection.recv(65536):
                    break

    def _get(self, path: str) -> None:
        chat = self.server.chat
        card = {"id": chat.name, "object": "model", "created": chat.created, "owned_by": "fedtune"}
        if path in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [card]})
        elif path.startswith(("/v1/models/", "/models/")) and path.rsplit("/", 1)[1] == chat.name:
            self._json(200, card)
        elif path == "/health":
            self._json(200, {"status": "ok", "model": chat.name, "generating": chat.active,
                             "waiting": self.server.queue.waiting, "tokens_generated": chat.tokens_generated})
        else:
            raise RequestError(404, f"no such endpoint: GET {path}")

    def _post(self, path: str, raw: bytes) -> None:
        chat = self.server.chat
        limit = min(self.server.max_tokens_limit or chat.max_context, chat.max_context)
        if path in CHAT_PATHS:
            req = parse_request(raw, chat.name, limit)
        elif path in TEXT_PATHS:
            req = parse_completion(raw, chat.name, limit)
        else:
            raise RequestError(404, f"no such endpoint: POST {path}")
        ids = chat.prompt_ids(req)  # a too-long prompt is a 400 before waiting
        gone = lambda: peer_closed(self.connection)  # noqa: E731
        try:
            with self.server.queue.turn(gone), contextlib.closing(chat.generate(req, ids, gone)) as events:
                self.server.count += 1
                if req.stream:
                    return self._stream(req, events)
                answer = self._answer(req, events)
        except QueueFull:
            raise RequestError(429, f"the model is busy and {self.server.queue.max_waiting} requests wait for it; "
                               "retry in a second", headers={"Retry-After": "1"}) from None
        self._json(200, answer)

    def _answer(self, req: GenRequest, events: Iterator) -> dict:
        text, tokens, finish = "", [], None
        for event in events:
            if isinstance(event, Piece):
                text, tokens = text + event.text, tokens + event.tokens
            else:
                finish = event
        assert isinstance(finish, Finish)
        if req.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text.strip()},
                      "logprobs": chat_logprobs(tokens) if req.logprobs else None, "finish_reason": finish.reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": text_logprobs(tokens, 0) if req.logprobs else None,
                      "finish_reason": finish.reason}
        return {**self._head(req, chunk=False), "choices": [choice], "usage": usage(finish.prompt_tokens, finish.completion_tokens)}

    def _head(self, req: GenRequest, chunk: bool) -> dict:
        kind = ("chat.completion" + (".chunk" if chunk else "")) if req.chat else "text_completion"
        return {"id": f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": self.server.chat.name}

    def _stream(self, req: GenRequest, events: Iterator) -> None:
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        head, offset = self._head(req, chunk=True), 0

        def send(choices: list, **extra: Any) -> None:
            chunk = {**head, "choices": choices, **({"usage": None} if req.include_usage else {}), **extra}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        def choice(text: str, tokens: list, finish: Optional[str]) -> dict:
            if req.chat:
                delta = {"content": text} if text or finish is None else {}
                return {"index": 0, "delta": delta, "logprobs": chat_logprobs(tokens) if req.logprobs else None, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": text_logprobs(tokens, offset) if req.logprobs else None, "finish_reason": finish}

        if req.chat:
            send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        try:
            for event in events:
                if isinstance(event, Piece) and (event.text or event.tokens):
                    send([choice(event.text, event.tokens, None)])
                    offset += len(event.text)
                elif isinstance(event, Finish):
                    send([choice("", [], event.reason)])
                    if req.include_usage:
                        send([], usage=usage(event.prompt_tokens, event.completion_tokens))
        except (ClientGone, OSError):
            raise
        except Exception as err:  # headers are sent: report the failure as an error event
            log.exception("streamed completion failed")
            error = RequestError(500, f"internal error: {type(err).__name__}: {err}").body()
            self.wfile.write(f"data: {json.dumps(error)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


class ChatServer(ThreadingHTTPServer):
    """The HTTP server: a thread per connection, one generation at a time with at most
    ``max_waiting`` requests waiting (more: 429). It binds at construction (so a busy port fails
    before a model is loaded); ``chat`` may be set afterwards, before ``serve_forever``."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of connections waits in the kernel instead of being reset

    def __init__(self, chat: Optional[ChatModel], host: str = "127.0.0.1", port: int = 8000, *,
                 api_key: Optional[str] = None, max_waiting: int = 16, io_timeout: float = 10.0,
                 max_tokens_limit: Optional[int] = None):
        check_listen(host, port, api_key, max_waiting, io_timeout, max_tokens_limit)
        self.chat, self.count = chat, 0  # count: completions started
        self.api_key, self.io_timeout, self.queue = api_key or None, io_timeout, ModelQueue(max_waiting)
        self.max_tokens_limit = max_tokens_limit  # None: the model's context
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"
