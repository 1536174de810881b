"""The judge client against a real `fedtune serve` server on 127.0.0.1 (the tiny model judges):
it will not judge well, so these tests check the plumbing — replies, cache, retries, rate
limit, errors — and that its malformed verdicts are counted as unparsed, not guessed."""

import json
import socket
import threading

import pytest

from fedtune.errors import JudgeError
from fedtune.evaluation.grading import Question, grade
from fedtune.evaluation.judge import JudgeClient, _reply_text, cache_key
from fedtune.serving import ChatServer, load_chat_model


@pytest.fixture(scope="module")
def chat(finished_run):
    return load_chat_model(finished_run, name="judge")


@pytest.fixture(scope="module")
def server(chat):
    srv = ChatServer(chat, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


class FakeTime:
    """A clock that only moves when the client sleeps (records the sleeps)."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def client(url, tmp_path, **kw):
    t = FakeTime()
    kw.setdefault("max_tokens", 4)
    return JudgeClient(url, "judge", cache_dir=tmp_path / "cache", sleep=t.sleep, clock=t.clock, **kw), t


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reply_is_cached_on_disk_by_model_and_prompt_hash(server, tmp_path):
    # Arrange
    judge, _ = client(server.url, tmp_path)
    messages = [{"role": "user", "content": "Rate this: 2 + 2 = 4"}]

    # Act
    first = judge.complete(messages)
    served = server.count
    second = judge.complete(messages)

    # Assert: the second answer came from the cache, not the server
    assert isinstance(first, str) and second == first
    assert server.count == served and judge.stats == {"requests": 1, "cached": 1, "retries": 0}
    path = tmp_path / "cache" / f"{cache_key('judge', messages, 4, 0.0)}.json"
    record = json.loads(path.read_text())
    assert record["model"] == "judge" and record["reply"] == first and record["messages"] == messages
    # a new client (a new process) with the same cache folder needs no server at all
    offline, _ = client(f"http://127.0.0.1:{free_port()}/v1", tmp_path, max_retries=0)
    assert offline.complete(messages) == first


def test_cache_key_depends_on_model_and_request():
    m = [{"role": "user", "content": "x"}]
    assert cache_key("a", m, 4, 0.0) != cache_key("b", m, 4, 0.0)
    assert cache_key("a", m, 4, 0.0) != cache_key("a", m, 5, 0.0)
    assert cache_key("a/b:c", m, 4, 0.0).startswith("a_b_c/")


def test_unreachable_endpoint_retries_with_backoff_then_one_line_error(tmp_path):
    # Arrange: nothing listens on this port
    judge, t = client(f"http://127.0.0.1:{free_port()}/v1", tmp_path, max_retries=3, backoff=0.5, requests_per_second=1000)

    # Act / Assert
    with pytest.raises(JudgeError, match=r"failed after 4 attempts \(cannot reach it: .*\); start the server") as err:
        judge.complete([{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value)
    assert t.sleeps == [0.5, 1.0, 2.0]  # backoff * 2**attempt between the 4 attempts
    assert judge.stats["retries"] == 3


def test_retry_reaches_a_server_that_comes_up_late(chat, tmp_path):
    # Arrange: the server starts during the first backoff
    port = free_port()
    started = []

    def sleep_and_start(seconds):
        if not started:
            srv = ChatServer(chat, "127.0.0.1", port)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            started.append(srv)

    judge = JudgeClient(f"http://127.0.0.1:{port}/v1", "judge", max_tokens=3, max_retries=2, sleep=sleep_and_start)

    # Act
    reply = judge.complete([{"role": "user", "content": "hi"}])

    # Assert
    assert isinstance(reply, str) and judge.stats["retries"] == 1 and started[0].count == 1
    started[0].shutdown()
    started[0].server_close()


def test_rate_limit_spaces_request_starts(server, tmp_path):
    judge, t = client(server.url, tmp_path, requests_per_second=2.0)
    for i in range(3):
        judge.complete([{"role": "user", "content": f"question {i}"}])
    assert t.sleeps == [0.5, 0.5]  # the fake clock stands still, so each later request waits 1/rps


def test_http_errors_other_than_429_5xx_are_not_retried(server, tmp_path):
    judge = JudgeClient(server.url, "not-served", max_retries=3, cache_dir=tmp_path)
    with pytest.raises(JudgeError, match=r"answered HTTP 404 \(model 'not-served' not found.*check eval.judge.base_url"):
        judge.complete([{"role": "user", "content": "hi"}])
    assert judge.stats["retries"] == 0


def test_a_reply_that_is_not_a_chat_completion_is_an_error():
    with pytest.raises(JudgeError, match="did not answer an OpenAI chat completion"):
        _reply_text(b'{"object": "list", "data": []}', "http://x/v1/chat/completions")
    assert _reply_text(b'{"choices": [{"message": {"content": "[[5]]"}}]}', "u") == "[[5]]"


def test_grading_with_a_real_judge_counts_malformed_verdicts_as_unparsed(server, tmp_path):
    # Arrange: the tiny random model cannot follow the rubric
    judge, _ = client(server.url, tmp_path, max_tokens=6)
    questions = [Question("What is 2 plus 2?", "2 plus 2 equals 4."), Question("Capital of France?", "Paris.")]

    # Act
    out = grade(judge.complete, questions, {"model": ["4", "Lyon"]})

    # Assert: every judgement was asked (2 reference + 2 single + 2 x 2 swapped pairwise) and nothing was invented
    assert judge.stats["requests"] == 8
    single, pair = out["models"]["model"]["single"], out["models"]["model"]["pairwise"]
    assert len(single["ratings"]) == 2 and len(pair["outcomes"]) == 2
    assert single["unparsed"] == sum(r is None for r in single["ratings"])
    assert pair["unparsed"] + pair["win"] + pair["tie"] + pair["loss"] == 2
