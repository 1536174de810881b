"""The OpenAI-compatible server, over real HTTP on 127.0.0.1."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from fedtune.serving import ChatServer, RequestError, cut_at_stop, load_chat_model, parse_request


@pytest.fixture(scope="module")
def server(finished_run):
    srv = ChatServer(load_chat_model(finished_run, name="tiny"), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


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
