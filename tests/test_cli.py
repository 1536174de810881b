"""The real `fedtune` command in a subprocess: exit codes and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def fedtune(*args, input=None, cwd=ROOT):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *map(str, args)], capture_output=True, text=True, env=env, input=input, cwd=cwd, timeout=600
    )


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr  # one line, and the last word
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in errors[0]


def test_validate_ok_and_config_errors():
    ok = fedtune("validate", "configs/demo.yaml")
    assert ok.returncode == 0 and "config ok" in ok.stdout
    bad = fedtune("validate", "configs/demo.yaml", "lora.r=0", "federation.fraction=2", "federation.rouns=3")
    assert_one_line_error(bad, 2, "lora.r: must be > 0", "federation.fraction", "did you mean 'federation.rounds'")
    assert_one_line_error(fedtune("validate", "configs/nope.yaml"), 2, "configs/nope.yaml not found")


def test_data_errors_exit_3(tmp_path, tiny_overrides):
    rows = tmp_path / "d.jsonl"
    rows.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "", "output": "b"}) + "\n")
    proc = fedtune("run", *tiny_overrides, f"data.path={rows}")
    assert_one_line_error(proc, 3, "d.jsonl: line 2: field 'instruction'")
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start
    proc = fedtune("run", *tiny_overrides, f"data.path={tmp_path / 'missing.jsonl'}")
    assert_one_line_error(proc, 3, "missing.jsonl not found")


def test_data_command_shows_the_split():
    proc = fedtune("data", "configs/demo.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "3000 examples" in proc.stdout and "held-out" in proc.stdout and "shards split" in proc.stdout


def test_run_generate_chat_and_resume_codes(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    proc = fedtune("run", *tiny_overrides, "federation.rounds=1")
    assert proc.returncode == 0, proc.stderr
    assert "held-out loss" in proc.stdout and (run_dir / "adapter" / "adapter_config.json").is_file()
    assert "round 1" in proc.stderr  # progress goes to stderr
    # the before/after samples come from the categories that improved most, and say so
    assert "samples from the held-out categories whose held-out loss fell most over the run: " in proc.stdout
    assert proc.stdout.index("samples from the") < proc.stdout.index("before:") < proc.stdout.index("after:")

    gen = fedtune("generate", run_dir, "What is 2 plus 2?", "--max-new-tokens", "3")
    assert gen.returncode == 0, gen.stderr
    chat = fedtune("chat", run_dir, "--max-new-tokens", "3", input="hello\n/reset\nagain\n\n")
    assert chat.returncode == 0 and chat.stdout.count("model>") == 2, chat.stderr

    assert_one_line_error(fedtune("run", "--resume", run_dir), 4, "already finished 1 rounds")
    assert_one_line_error(fedtune("run", *tiny_overrides, "federation.rounds=1"), 2, "already holds files")
    assert_one_line_error(fedtune("generate", tmp_path / "nowhere", "hi"), 4, "not a fedtune run directory")
    resumed = fedtune("run", "--resume", run_dir, "federation.rounds=2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert "report:" not in proc.stdout + resumed.stdout  # output.report=false: no report, none named
    assert_one_line_error(fedtune("run", *tiny_overrides, "--from-round", "1"), 2, "--from-round N needs --resume")


# A fault injected into the real CLI process: FEDTUNE_TEST_PATCH is exec'd before the command runs.
PATCHED = "import os, sys; exec(os.environ['FEDTUNE_TEST_PATCH']); from fedtune.cli import main; sys.argv[0] = 'fedtune'; main()"
CTRL_C_IN_ROUND_1 = """
import signal
from fedtune.reporting.progress import RichProgress
_started = RichProgress.round_started
def _press(self, round, clients):
    _started(self, round, clients)
    if round == 1:
        os.kill(os.getpid(), signal.SIGINT)
RichProgress.round_started = _press
"""
DISK_FULL_AT_ROUND_2 = """
import errno
import fedtune.federation.checkpoint as ck
_fsync = ck._fsync
def _full(path):
    if "round_00002" in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    _fsync(path)
ck._fsync = _full
"""


def patched_fedtune(patch, *args):
    env = {**os.environ, "COLUMNS": "200", "FEDTUNE_TEST_PATCH": patch}
    return subprocess.run([sys.executable, "-c", PATCHED, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_ctrl_c_exits_130_and_disk_full_is_one_error(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    stopped = patched_fedtune(CTRL_C_IN_ROUND_1, "run", *tiny_overrides)
    assert stopped.returncode == 130, stopped.stderr
    assert f"stopped after round 1; resume with: fedtune run --resume {run_dir}" in stopped.stderr
    assert "held-out" not in stopped.stdout and "adapter" not in stopped.stdout and not (run_dir / "adapter").exists()

    full = patched_fedtune(DISK_FULL_AT_ROUND_2, "run", "--resume", run_dir)
    assert_one_line_error(full, 4, "round_00002", "No space left on device", f"fedtune run --resume {run_dir}")
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "round_00001"  # the last checkpoint is intact
    done = fedtune("run", "--resume", run_dir)
    assert done.returncode == 0 and "adapter (PEFT format)" in done.stdout, done.stderr


def test_model_errors_exit_6(tiny_overrides, tmp_path):
    proc = fedtune("run", *tiny_overrides, f"model.name={tmp_path / 'no-model'}")
    assert_one_line_error(proc, 6, "model folder", "not found; check model.name")


def test_dpo_run_shows_reward_metrics_and_bad_pairs_exit_3(tiny_overrides, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}) + "\n"
        + json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"}) + "\n"
    )
    bad = fedtune("run", *tiny_overrides, "task=dpo", f"data.path={pairs}")
    assert_one_line_error(bad, 3, "pairs.jsonl: line 2: 'chosen' and 'rejected' differ at turn 1")

    ok = fedtune("run", *tiny_overrides, "task=dpo", "federation.rounds=1", "train.local_steps=1")
    assert ok.returncode == 0, ok.stderr
    assert "held-out DPO loss, reward accuracy, margin" in ok.stdout and "0.693, 0.500, +0.000" in ok.stdout
    assert "reward accuracy" in ok.stderr


def test_eval_report_and_serve_commands(finished_run, tmp_path):
    import shutil
    import socket

    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    ev = fedtune("eval", run_dir, "eval.generation_examples=2")
    assert ev.returncode == 0, ev.stderr
    assert "ROUGE-L" in ev.stdout and "evaluations/heldout.json" in ev.stdout.replace("\n", "")
    for phase in ("loading model", "tokenising", "held-out loss", "generating answers"):  # no silent wait; lines in a log
        assert f"{phase} ..." in ev.stderr and f"{phase} done in" in ev.stderr, ev.stderr
    assert "\r" not in ev.stderr
    rep = fedtune("report", run_dir)
    assert rep.returncode == 0 and "report.html" in rep.stdout
    assert_one_line_error(fedtune("eval", tmp_path / "nowhere"), 4, "not a fedtune run directory")
    assert_one_line_error(fedtune("report", tmp_path), 4, "holds neither metrics.jsonl nor comparison.json")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(fedtune("serve", run_dir, "--port", port), 1, f"cannot listen on 127.0.0.1:{port}")


def test_compare_command_prints_the_table(tiny_overrides, tmp_path):
    proc = fedtune("compare", *tiny_overrides, "federation.rounds=1", "compare.models=[base, federated]", "eval.generation_examples=2")
    assert proc.returncode == 0, proc.stderr
    assert "held-out loss per category" in proc.stdout and "federated" in proc.stdout and "ROUGE-L" in proc.stdout
    # the gap, with the held-out set size and its interval
    assert "held-out loss gaps on 30 held-out examples (95% paired bootstrap interval over examples" in proc.stdout
    assert "federated - base" in proc.stdout and "ROUGE-L and exact match on 2 answers per model, with 95% bootstrap" in proc.stdout
    assert (tmp_path / "run" / "comparison.json").is_file() and (tmp_path / "run" / "report.html").is_file()


def test_run_in_local_mode_gives_each_client_its_own_run(tiny_overrides, tmp_path):
    proc = fedtune("run", *tiny_overrides, "federation.mode=local", "local.clients=[0, 2]", "federation.rounds=1")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in sorted((tmp_path / "run").iterdir())] == ["local-0", "local-2"]
    assert all((tmp_path / "run" / d / "adapter" / "adapter_config.json").is_file() for d in ("local-0", "local-2"))


def test_flower_app_writes_a_flower_app_and_flower_run_needs_tls_or_insecure(tiny_overrides, tmp_path):
    proc = fedtune("flower", "app", *tiny_overrides, "federation.engine=flower", "--out", tmp_path / "app")
    assert proc.returncode == 0, proc.stderr
    assert 'serverapp = "fedtune.federation.flower.server_app:app"' in (tmp_path / "app" / "pyproject.toml").read_text()
    assert f"flwr run {tmp_path / 'app'}" in proc.stdout

    proc = fedtune("flower", "run", *tiny_overrides, "federation.engine=flower", "--superlink", "127.0.0.1:1")
    assert_one_line_error(proc, 2, "--root-certificates ca.crt", "--insecure")
    proc = fedtune("flower", "app", *tiny_overrides, "--out", tmp_path / "other")
    assert_one_line_error(proc, 2, "needs federation.engine=flower")


SECRET = "Secret row: Müller earns 12345"


def test_bad_data_files_are_one_line_errors_that_never_print_rows(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes((json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "q", "output": SECRET}, ensure_ascii=False) + "\n").encode("latin-1"))
    (tmp_path / "ok.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    as_list = tmp_path / "list.jsonl"
    as_list.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" + json.dumps({"instruction": "q", "response": [SECRET]}) + "\n")
    for args, needles in (
        ([f"data.path={latin}"], ["latin.jsonl: line 2 is not UTF-8 (byte 0xfc", "save the file as UTF-8"]),
        ([f"data.path={as_list}", "data.columns.output=response"], ["list.jsonl: line 2: field 'output' (column 'response') holds a list"]),
        ([f"data.path={latin.with_name('ok.jsonl')}", "data.columns.input=context"], ["column 'context' for field 'input'", "columns: instruction, output"]),
    ):
        proc = fedtune("data", *args)
        assert_one_line_error(proc, 3, *needles)
        assert "Müller" not in proc.stdout + proc.stderr

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "", "output": SECRET}) + "\n")
    debug = fedtune("--debug", "data", f"data.path={empty}")  # a traceback, but without locals: no rows
    assert "Traceback" in debug.stderr and "DataError" in debug.stderr and "12345" not in debug.stdout + debug.stderr


def test_bad_config_files_and_seeds_are_config_errors(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 1\n# Müller\n".encode("latin-1"))
    assert_one_line_error(fedtune("validate", latin), 2, "latin.yaml line 2: not UTF-8 text")
    dup = tmp_path / "dup.yaml"
    dup.write_text("data:\n  path: demo\nseed: 3\ndata:\n  limit: 5\n")
    assert_one_line_error(fedtune("validate", dup), 2, "dup.yaml line 4: key 'data' appears twice (first on line 1)")
    assert_one_line_error(fedtune("validate", "configs/demo.yaml", "seed=-1"), 2, "seed: must be >= 0, got -1")


def test_a_truncated_model_file_exits_6(tiny_overrides, tiny_model_dir, tmp_path):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = fedtune("run", *tiny_overrides, f"model.name={model}")
    assert_one_line_error(proc, 6, f"{weights} is truncated or corrupt", "copy or download the model")


def test_a_failed_flower_run_exits_8(monkeypatch):
    from typer.testing import CliRunner

    from fedtune import cli
    from fedtune.federation.flower import deploy

    monkeypatch.setattr(cli, "_quiet_libraries", lambda debug: None)  # no process-wide logging setup in pytest
    monkeypatch.setattr(deploy, "flwr_run", lambda *a, **k: {"status": "finished:failed", "status-details": "a ClientApp crashed"})
    result = CliRunner().invoke(cli.app, ["flower", "run", "configs/demo.yaml", "federation.engine=flower", "--superlink", "127.0.0.1:1", "--insecure"])
    assert result.exit_code == 8, result.output
    assert "error: the Flower run ended finished:failed: a ClientApp crashed" in result.output


# ----------------------------------------------------------------------------- fedtune chat, on a terminal


class Terminal:
    """`fedtune chat` with its stdin and stdout on a pseudo-terminal (readline is live), stderr in a file."""

    def __init__(self, run_dir, cache, log):
        import pty
        import signal

        self.master, slave = pty.openpty()
        env = {**os.environ, "COLUMNS": "200", "TERM": "xterm", "FEDTUNE_CACHE": str(cache)}
        self.log = open(log, "w+")
        # a terminal's foreground job gets Ctrl-C even where this suite runs as a background job, whose
        # SIGINT is ignored (and an ignored signal stays ignored across exec): the child starts with the default
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "chat", run_dir, "--max-new-tokens", "6"],
                                         stdin=slave, stdout=slave, stderr=self.log, env=env, cwd=ROOT)
        finally:
            signal.signal(signal.SIGINT, previous)
        os.close(slave)
        self.seen = ""

    def expect(self, needle, timeout=120):
        """Read until ``needle`` shows up (after what earlier expects consumed); the text before it."""
        import select
        import time

        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            assert time.monotonic() < deadline, f"no {needle!r} in {self.seen!r}"
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    assert False, f"chat exited before {needle!r}: {self.seen!r}"
            elif self.proc.poll() is not None:
                assert False, f"chat exited ({self.proc.returncode}) before {needle!r}: {self.seen!r}"
        before, _, self.seen = self.seen.partition(needle)
        return before

    def send(self, text):
        os.write(self.master, text.encode())

    def interrupt(self):
        """Ctrl-C at the prompt, pressed again while the chat shows no reaction. CPython's readline
        misses a SIGINT that lands between drawing the prompt and blocking in select() (select then
        waits for the next key or signal; 11 of 100 tries on a loaded 2-core machine), so a lone
        signal sent the moment the prompt shows can hang the chat. The chat reacts by ending the
        line; until then it is provably still inside input(), where a second signal is safe."""
        import select
        import signal
        import time

        for _ in range(10):
            self.proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 3
            while "\n" not in self.seen and self.proc.poll() is None and time.monotonic() < deadline:
                if select.select([self.master], [], [], 0.2)[0]:
                    try:
                        self.seen += os.read(self.master, 4096).decode(errors="replace")
                    except OSError:  # the child closed the terminal
                        return
            if "\n" in self.seen or self.proc.poll() is not None:
                return
        assert False, f"chat never reacted to Ctrl-C at the prompt: {self.seen!r}"

    def finish(self):
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        self.log.seek(0)
        return code, self.log.read()


def test_chat_on_a_terminal_streams_keeps_history_and_ends_cleanly(finished_run, tmp_path):
    # Arrange, Act: an empty line does nothing, a question gets a reply, /exit ends with 0
    chat = Terminal(finished_run, tmp_path / "cache", tmp_path / "err1")
    chat.expect("you> ")
    chat.send("\n")
    chat.expect("you> ")
    assert chat.proc.poll() is None  # still chatting
    chat.send("hello there\n")
    chat.expect("model> ")
    chat.expect("you> ")
    chat.send("/exit\n")
    code, err = chat.finish()
    assert code == 0, err
    assert "hello there" in (tmp_path / "cache" / "chat_history").read_text()

    # Act: a new chat recalls that line with the up arrow (line editing), then Ctrl-C at the prompt ends it
    chat = Terminal(finished_run, tmp_path / "cache", tmp_path / "err2")
    chat.expect("you> ")
    chat.send("\x1b[A\x1b[A\n")  # up arrow twice (past /exit), Enter: the recalled question is answered
    assert "hello there" in chat.expect("model> ")
    chat.expect("you> ")
    chat.interrupt()
    code, err = chat.finish()

    # Assert
    assert code == 0, err
    assert "resume" not in err and "interrupted" not in err and "Traceback" not in err


def test_chat_prints_a_reply_as_it_is_generated_and_ctrl_c_stops_only_the_reply(monkeypatch):
    import io

    from fedtune import cli
    from fedtune.serving.engine import Finish, Piece

    screen = io.StringIO()
    monkeypatch.setattr(cli.out, "file", screen)

    class Model:
        def prompt_ids(self, req):
            return [1, 2]

        def generate(self, req, ids):
            yield Piece("Hel", [])
            assert screen.getvalue() == "model> Hel"  # shown before the next token exists
            yield Piece("lo", [])
            if req.max_tokens == 1:
                raise KeyboardInterrupt  # Ctrl-C while generating
            yield Finish("stop", 2, 2)

    assert cli._stream_reply(Model(), [{"role": "user", "content": "hi"}], 8) == "Hello"
    assert screen.getvalue() == "model> Hello\n"
    screen.truncate(0), screen.seek(0)
    assert cli._stream_reply(Model(), [{"role": "user", "content": "hi"}], 1) == "Hello"  # the partial reply is kept
    assert screen.getvalue() == "model> Hello [stopped]\n"


def test_centralized_on_flower_is_refused_before_anything_starts(tiny_overrides):
    proc = fedtune("run", *tiny_overrides, "federation.engine=flower", "federation.mode=centralized")
    assert_one_line_error(proc, 2, "federation.mode: centralized pools every client's data", "federation.engine=inprocess")


def test_compare_table_shows_no_rouge_or_exact_match_without_answers(monkeypatch):
    """eval.generation_examples=0: the summary printed ROUGE-L 0.000 and exact match 0.000 on no answers."""
    import io

    from rich.console import Console

    from fedtune import cli

    monkeypatch.setattr(cli, "out", Console(file=io.StringIO(), width=200))
    heldout = {"loss": 1.0, "ppl": 2.72, "per_category": {"a": {"loss": 1.0}}}
    comp = {"name": "c", "models": ["base", "federated"], "heldout": {"base": heldout, "federated": heldout},
            "generation": {m: {"rouge_l": 0.0, "exact_match": 0.0, "examples": 0, "per_category": {}} for m in ("base", "federated")},
            "judge": None, "summary": {"ordering": {}}, "budget": {"base": {"optimizer_steps": 0}, "federated": {"optimizer_steps": 4}},
            "budget_note": "note"}
    cli._show_comparison(comp)
    rows = [line for line in cli.out.file.getvalue().splitlines() if "federated" in line and "1.0000" in line]
    assert rows and "0.000" not in rows[0] and rows[0].count(" - ") >= 2, rows
