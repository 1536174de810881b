"""The OpenAI-compatible server, over real HTTP on 127.0.0.1."""

import contextlib
import http.client
import json
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
import torch

from fedtune.errors import ConfigError
from fedtune.serving import (MAX_BODY, ChatServer, RequestError, check_listen, cut_at_stop, load_chat_model, parse_request,
                             pick_token)
from fedtune.serving.queue import ModelQueue, QueueFull
from tests.test_cli import assert_one_line_error, fedtune


@pytest.fixture(scope="module")
def chat(finished_run):
    return load_chat_model(finished_run, name="tiny")


@contextlib.contextmanager
def serving(chat, **kw):
    srv = ChatServer(chat, "127.0.0.1", 0, **kw)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(chat):
    with serving(chat, io_timeout=1.0) as srv:
        yield srv


def call(srv, path, body=None, raw=None, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(srv.url.removesuffix("/v1") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def test_models_lists_the_served_model(server):
    status, kind, text = call(server, "/v1/models")
    assert status == 200 and kind == "application/json"
    body = json.loads(text)
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]
    assert json.loads(call(server, "/v1/models/tiny")[2])["object"] == "model"


def test_chat_completion_is_a_valid_openai_response(server):
    # Act
    status, kind, text = call(server, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"}],
        "max_tokens": 3, "temperature": 0,
    })

    # Assert
    assert status == 200 and kind == "application/json"
    body = json.loads(text)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 3 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_greedy_answers_are_repeatable_and_text_parts_are_accepted(server):
    ask = lambda content: json.loads(call(server, "/v1/chat/completions", {  # noqa: E731
        "messages": [{"role": "user", "content": content}], "max_tokens": 4})[2])["choices"][0]["message"]["content"]
    assert ask("hello") == ask([{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}])


def test_stop_strings_end_the_answer(server):
    ask = lambda **kw: json.loads(call(server, "/v1/chat/completions", {  # noqa: E731
        "messages": [{"role": "user", "content": "Write two lines."}], "max_tokens": 8, **kw})[2])["choices"][0]
    free = ask()
    cut = ask(stop=["\n"])
    assert "\n" not in cut["message"]["content"] and free["message"]["content"].startswith(cut["message"]["content"])
    assert cut["finish_reason"] == "stop" or cut["message"]["content"] == free["message"]["content"]


def test_streaming_sends_chunks_then_done(server):
    status, kind, text = call(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    assert status == 200 and kind == "text/event-stream"
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "raw, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"messages": []}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), "messages[0].role"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "messages[0].content"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}).encode(), "temperature"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), "n"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}).encode(), "stop"),
    ],
)
def test_malformed_requests_get_400_and_a_json_error(server, raw, param):
    status, kind, text = call(server, "/v1/chat/completions", raw=raw)
    assert status == 400 and kind == "application/json"
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_unknown_model_and_path_get_404(server):
    status, _, text = call(server, "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and "this server serves 'tiny'" in json.loads(text)["error"]["message"]
    assert call(server, "/v1/nothing")[0] == 404
    assert call(server, "/v1/nothing", {"prompt": "hi"})[0] == 404


def test_empty_body_is_400(server):
    assert call(server, "/v1/chat/completions", raw=b"", method="POST")[0] == 400


def test_parse_request_defaults_and_aliases():
    req = parse_request(json.dumps({"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}],
                                    "max_completion_tokens": 7, "stop": "END"}).encode(), "m")
    assert req.max_tokens == 7 and req.stop == ["END"] and req.temperature == 0.0 and not req.stream
    assert req.messages[0]["role"] == "system"
    with pytest.raises(RequestError, match="at least one user message"):
        parse_request(json.dumps({"messages": [{"role": "system", "content": "x"}]}).encode(), "m")


def test_cut_at_stop():
    assert cut_at_stop("one two END three", ["END", "two"]) == ("one ", True)
    assert cut_at_stop("no stop here", ["END"]) == ("no stop here", False)


# ----------------------------------------------------------------------------- robustness (issue 15)

CHAT = {"messages": [{"role": "user", "content": "Tell me a story."}]}


def raw_http(srv, data: bytes, timeout: float = 30) -> tuple[int, dict, dict]:
    """Send raw bytes, read to the end; (status, lower-cased headers, JSON body)."""
    with socket.create_connection(srv.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def assert_openai_error(body: dict, code=None) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert code is None or error["code"] == code
    return error


@contextlib.contextmanager
def slow_and_endless(chat, monkeypatch, seconds_per_token=0.01):
    """Each forward pass sleeps and the end of turn is never sampled: a generation runs to max_tokens."""
    handle = chat.model.register_forward_pre_hook(lambda *_: time.sleep(seconds_per_token))
    monkeypatch.setattr(chat, "_eos_ids", lambda: set())
    try:
        yield
    finally:
        handle.remove()


def wait_until(condition, limit_s=5.0) -> bool:
    for _ in range(int(limit_s / 0.01)):
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_fifty_concurrent_requests_each_get_200_or_a_json_429(chat):
    # Arrange: 4 may wait for the model; 50 clients start together
    n, results = 50, []
    with serving(chat, max_waiting=4) as srv:
        start = threading.Barrier(n)

        def client() -> None:
            start.wait(timeout=30)
            began = time.perf_counter()
            try:
                conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
                conn.request("POST", "/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 8}),
                             {"Content-Type": "application/json"})
                reply = conn.getresponse()
                out = (reply.status, reply.getheader("Retry-After"), json.loads(reply.read()))
                conn.close()
            except OSError as err:  # a reset: what a listen backlog of 5 gave
                out = (type(err).__name__, None, None)
            results.append((*out, time.perf_counter() - began))

        # Act
        threads = [threading.Thread(target=client) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)

    # Assert
    statuses = Counter(r[0] for r in results)
    latencies = sorted(r[3] for r in results)
    print(f"\nload: {len(results)} requests, {statuses[200]} x 200, {statuses[429]} x 429, "
          f"{len(results) - statuses[200] - statuses[429]} other, p50 {statistics.median(latencies):.3f} s, max {latencies[-1]:.3f} s")
    assert len(results) == n and set(statuses) <= {200, 429} and statuses[200] >= 5
    for status, retry_after, body, _ in results:
        if status == 429:
            assert retry_after == "1" and assert_openai_error(body, "rate_limit_exceeded")["type"] == "rate_limit_error"
        else:
            assert body["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("stream", [True, False])
def test_a_dropped_request_stops_generating(chat, server, monkeypatch, stream):
    # Arrange: a generation that would take 400 tokens x 10 ms
    with slow_and_endless(chat, monkeypatch):
        before = chat.tokens_generated
        sock = socket.create_connection(server.server_address[:2], timeout=30)
        sock.sendall(post("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 400, "stream": stream}).encode()))
        assert wait_until(lambda: chat.active == 1 and chat.tokens_generated > before + 2)

        # Act: the client goes away mid-generation
        sock.close()

        # Assert: the generation ends, long before its 400 tokens
        assert wait_until(lambda: chat.active == 0)
        assert chat.tokens_generated - before < 200
        assert json.loads(call(server, "/health")[2])["generating"] == 0


def test_a_request_dropped_while_waiting_leaves_the_line(chat, server, monkeypatch):
    with slow_and_endless(chat, monkeypatch):
        running = socket.create_connection(server.server_address[:2], timeout=30)
        running.sendall(post("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 400}).encode()))
        assert wait_until(lambda: chat.active == 1)
        waiting = socket.create_connection(server.server_address[:2], timeout=30)
        waiting.sendall(post("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 400}).encode()))
        assert wait_until(lambda: server.queue.waiting == 1)
        waiting.close()
        assert wait_until(lambda: server.queue.waiting == 0)
        running.close()
        assert wait_until(lambda: chat.active == 0)


def test_seeded_sampling_is_the_same_when_a_dropped_stream_ran_before(chat, server, monkeypatch):
    ask = {**CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 123}
    alone = json.loads(call(server, "/v1/chat/completions", ask)[2])["choices"][0]["message"]["content"]
    with slow_and_endless(chat, monkeypatch, 0.005):
        sock = socket.create_connection(server.server_address[:2], timeout=30)  # a sampling stream, dropped
        sock.sendall(post("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 300, "stream": True, "temperature": 1.0,
                                                               "seed": 5}).encode()))
        assert wait_until(lambda: chat.active == 1 and chat.tokens_generated > 0)
        sock.close()
        assert wait_until(lambda: chat.active == 0)  # before the fix its generation ran on, sharing the global RNG
        meanwhile = json.loads(call(server, "/v1/chat/completions", ask)[2])["choices"][0]["message"]["content"]
    assert meanwhile == alone


def test_seeded_sampling_is_the_same_while_another_request_waits_and_runs(chat, server, monkeypatch):
    ask = {**CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 7}
    alone = json.loads(call(server, "/v1/chat/completions", ask)[2])["choices"][0]["message"]["content"]
    with slow_and_endless(chat, monkeypatch, 0.002):
        other = threading.Thread(target=call, args=(server, "/v1/chat/completions",
                                                    {**CHAT, "max_tokens": 100, "temperature": 1.0, "seed": 8}))
        other.start()
        assert wait_until(lambda: chat.active == 1)
        torch.manual_seed(999)  # the process's RNG plays no part
        meanwhile = json.loads(call(server, "/v1/chat/completions", ask)[2])["choices"][0]["message"]["content"]
        other.join(timeout=60)
    assert meanwhile == alone
    different = json.loads(call(server, "/v1/chat/completions", {**ask, "seed": 8, "max_tokens": 16})[2])
    assert different["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "data, status, code",
    [
        (post("/v1/chat/completions", json.dumps({**CHAT, "seed": 2**64}).encode()), 400, "invalid_value"),
        (post("/v1/chat/completions", json.dumps({**CHAT, "seed": -1}).encode()), 400, "invalid_value"),
        (post("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 10**9}).encode()), 400, "invalid_value"),
        (post("/v1/chat/completions", json.dumps({**CHAT, "top_logprobs": 2}).encode()), 400, "invalid_value"),
        (post("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "word " * 600}]}).encode()),
         400, "context_length_exceeded"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}", 400, "invalid_value"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 411, "length_required"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411, "length_required"),
        (f"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n{{".encode(), 413, "request_too_large"),
        (b"PUT /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405, "method_not_allowed"),
        (b"DELETE /v1/models HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
        (b"BREW /v1/models HTTP/1.1\r\n\r\n", 501, "not_implemented"),
        (b"GET /v1/nothing HTTP/1.1\r\n\r\n", 404, "not_found"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"messages\"", 408, "request_timeout"),
    ],
    ids=["seed-2**64", "seed-negative", "max_tokens-1e9", "top_logprobs-alone", "prompt-too-long", "content-length-abc",
         "no-content-length", "chunked", "body-too-large", "put", "delete", "unknown-method", "no-endpoint", "stalled-body"],
)
def test_bad_requests_get_json_errors(server, data, status, code):
    got, headers, body = raw_http(server, data)
    assert got == status and headers["content-type"] == "application/json"
    assert_openai_error(body, code)
    if status == 405:
        assert headers["allow"] == "GET, POST"


def test_a_stalled_request_line_is_dropped_after_the_timeout(server):
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"GET /v1/mod")
        assert sock.recv(100) == b""  # closed by the server (io_timeout 1 s), not held forever


def test_api_key_is_required_when_set(chat):
    with serving(chat, api_key="s3cret") as srv:
        models = b"GET /v1/models HTTP/1.1\r\n%s\r\n"
        status, headers, body = raw_http(srv, models % b"")
        assert status == 401 and headers["www-authenticate"] == "Bearer" and assert_openai_error(body, "invalid_api_key")
        assert raw_http(srv, models % b"Authorization: Bearer wrong\r\n")[0] == 401
        assert raw_http(srv, post("/v1/chat/completions", json.dumps(CHAT).encode()))[0] == 401
        assert raw_http(srv, models % b"Authorization: Bearer s3cret\r\n")[0] == 200
        assert raw_http(srv, b"GET /health HTTP/1.1\r\n\r\n")[0] == 200


def test_listening_beyond_loopback_needs_a_key_and_ports_are_checked():
    with pytest.raises(ConfigError, match="--api-key"):
        check_listen("0.0.0.0", 8000, None)
    check_listen("0.0.0.0", 8000, "key")
    for blank in ("", "   "):
        with pytest.raises(ConfigError, match="--api-key"):
            check_listen("0.0.0.0", 8000, blank)
    check_listen("::1", 8000, None)
    check_listen("localhost", 8000, None)
    with pytest.raises(ConfigError, match="--port must be in 0..65535, got 70000"):
        check_listen("127.0.0.1", 70000, None)


def test_serve_cli_refuses_bad_settings_in_one_line(finished_run):
    assert_one_line_error(fedtune("serve", finished_run, "--port", "70000"), 2, "--port must be in 0..65535, got 70000")
    assert_one_line_error(fedtune("serve", finished_run, "--host", "0.0.0.0"), 2, "--api-key")


def test_model_queue_is_fifo_and_bounded():
    queue, order = ModelQueue(max_waiting=2, poll_s=0.01), []
    hold = threading.Event()

    def first() -> None:
        with queue.turn():
            order.append(0)
            hold.wait(10)

    def later(i: int) -> None:
        with queue.turn():
            order.append(i)

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert wait_until(lambda: order == [0])
    for i in (1, 2):
        threads.append(threading.Thread(target=later, args=(i,)))
        threads[-1].start()
        assert wait_until(lambda: queue.waiting == i)
    with pytest.raises(QueueFull):
        with queue.turn():
            pass
    hold.set()
    for t in threads:
        t.join(timeout=10)
    assert order == [0, 1, 2] and queue.waiting == 0


def test_pick_token_greedy_nucleus_and_seeded():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert pick_token(logits, 0.0, 1.0, torch.Generator()) == 1
    assert all(pick_token(logits, 1.0, 1e-6, torch.Generator().manual_seed(s)) == 1 for s in range(20))  # nucleus: the top token
    draws = lambda: [pick_token(logits, 1.0, 0.9, g) for g in [torch.Generator().manual_seed(3)] for _ in range(30)]  # noqa: E731
    first = draws()
    assert first == draws() and set(first) <= {1, 3, 2} and 0 not in first


# ----------------------------------------------------------------------------- logprobs, stream usage, completions (issue 16)

def sse(text: str) -> list:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_logprobs_follow_openai_shape(server):
    status, _, text = call(server, "/v1/chat/completions", {**CHAT, "max_tokens": 5, "logprobs": True, "top_logprobs": 3})
    choice = json.loads(text)["choices"][0]
    content = choice["logprobs"]["content"]
    assert status == 200 and 1 <= len(content) <= 5
    assert "".join(c["token"] for c in content).strip() == choice["message"]["content"]
    for c in content:  # greedy: the chosen token is the most likely one
        assert c["logprob"] <= 0 and c["bytes"] == list(c["token"].encode()) and len(c["top_logprobs"]) == 3
        assert c["top_logprobs"][0]["token"] == c["token"] and c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"], rel=1e-6)
        assert [t["logprob"] for t in c["top_logprobs"]] == sorted((t["logprob"] for t in c["top_logprobs"]), reverse=True)
    plain = json.loads(call(server, "/v1/chat/completions", {**CHAT, "max_tokens": 5})[2])["choices"][0]
    assert plain["logprobs"] is None and plain["message"]["content"] == choice["message"]["content"]


def test_stream_usage_and_logprobs_chunks(server):
    body = {**CHAT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
    chunks = sse(call(server, "/v1/chat/completions", body)[2])
    *content, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4 and last["usage"]["total_tokens"] > 4
    assert all(c["usage"] is None for c in content) and content[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    tokens = [t["token"] for c in content if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
    assert "".join(tokens) == streamed and len(tokens) == 4
    assert "usage" not in sse(call(server, "/v1/chat/completions", {**CHAT, "max_tokens": 2, "stream": True})[2])[-1]


def test_legacy_completions_plain_streamed_and_logprobs(server):
    ask = {"prompt": "The capital of France is", "max_tokens": 6}
    status, _, text = call(server, "/v1/completions", {**ask, "logprobs": 2})
    body = json.loads(text)
    (choice,) = body["choices"]
    assert status == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["token_logprobs"]) == len(lp["tokens"]) == body["usage"]["completion_tokens"]
    assert all(len(top) <= 2 for top in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    chunks = sse(call(server, "/v1/completions", {**ask, "stream": True})[2])
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    seeded = {**ask, "temperature": 1.0, "seed": 11}
    assert json.loads(call(server, "/v1/completions", seeded)[2]) ["choices"][0]["text"] == \
        json.loads(call(server, "/v1/completions", seeded)[2])["choices"][0]["text"]
    assert call(server, "/v1/completions", {**ask, "logprobs": 6})[0] == 400
    assert call(server, "/v1/completions", {"prompt": ""})[0] == 400
