"""The ``fedtune`` command line. Thin: each command parses its arguments, calls one library
function and shows the result. User errors print ``error: <one line>`` and exit non-zero
(code per error class); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedtune import native_memory
from fedtune.errors import FederationError, FedtuneError

# No locals in tracebacks (--debug or a bug): they would print training rows and config values.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Federated fine-tuning of LLMs with LoRA.")
out = Console()
err = Console(stderr=True, log_path=False)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks and library logs")) -> None:
    _state["debug"] = debug
    _quiet_libraries(debug)
    native_memory.tune()  # freed activation buffers go back to the system (fedtune/native_memory.py)


def _quiet_libraries(debug: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedtune").setLevel(logging.INFO if not debug else logging.DEBUG)
    if not debug:
        import warnings

        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def _quiet_flower() -> None:
    """Flower sets its logger to DEBUG when imported: keep it to errors unless --debug."""
    import flwr.supercore.logger  # noqa: F401

    logging.getLogger("flwr").setLevel(logging.DEBUG if _state["debug"] else logging.ERROR)


def handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedtuneError as e:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)  # [x] is text
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; the last finished round's checkpoint is intact (resume with `fedtune run --resume` and the run directory)")
            raise typer.Exit(130) from None

    return wrapper


def _split_args(args: List[str]) -> tuple[Optional[str], list[str]]:
    """(config path or None, overrides): the first argument is a config unless it has '='."""
    if args and "=" not in args[0] and not args[0].startswith("~"):
        return args[0], args[1:]
    return None, list(args)


def _config(path: Optional[str], overrides: list[str]):
    """The validated config: ``path`` is a YAML file or, when no such file exists, a bundled recipe's name."""
    from fedtune.api import load_config

    return load_config(path, overrides)


CONFIG_ARGS = "CONFIG (a YAML file or a bundled recipe: `fedtune recipes`) then key=value overrides (every key: `fedtune config`)"


@app.command()
@handle_errors
def run(
    args: List[str] = typer.Argument(None, help=CONFIG_ARGS + ", e.g. `fedtune run demo federation.rounds=5`"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue this run directory from its last checkpoint"),
    from_round: Optional[int] = typer.Option(
        None, "--from-round", help="with --resume: continue from this kept round's checkpoint (later rounds are discarded)"
    ),
) -> None:
    """Run a federation (or resume one). Ctrl-C stops after the current round (exit 130).

    ARGS: CONFIG, a YAML file or a bundled recipe's name (`fedtune recipes`), then key=value
    overrides: `fedtune run demo federation.rounds=5 output.dir=runs/r5`. Every setting, its
    default and help: `fedtune config` (one section: `fedtune config lora`)."""
    from fedtune import api
    from fedtune.errors import ConfigError
    from fedtune.reporting.progress import RichProgress

    if from_round is not None and resume is None:
        raise ConfigError("--from-round N needs --resume RUN_DIR (the run to rewind)")
    native_memory.bound_kernel_caches()  # training: one kernel per matmul shape otherwise (fedtune/native_memory.py)
    path, overrides = _split_args(args or [])
    cfg = api.run_config(path, overrides, resume=resume)  # with --resume and no CONFIG: the run's own config
    if cfg.federation.engine == "flower":
        _quiet_flower()
    stop = threading.Event()
    signal.signal(signal.SIGINT, functools.partial(_on_interrupt, stop))
    results = api.run(cfg, resume=resume, from_round=from_round, progress=RichProgress(err), stop=stop)
    results = results if isinstance(results, list) else [results]
    for result in results:
        _show_result(result)
    if results and not results[-1].finished:  # Ctrl-C after a round: not a finished run
        stopped = results[-1]
        err.print(f"stopped after round {stopped.rounds_done}; resume with: fedtune run --resume {stopped.run_dir}", highlight=False)
        raise typer.Exit(130)


def _on_interrupt(stop: threading.Event, *_: object) -> None:
    if stop.is_set():
        raise KeyboardInterrupt
    stop.set()
    err.print("[yellow]stopping after this round and its checkpoint (Ctrl-C again to stop now)[/]")


def _show_result(result) -> None:
    """A finished run's before/after table, samples and adapter; the report of any run."""
    from fedtune.federation.rundir import finished_adapter

    before, after = result.initial_eval, result.final_eval
    if result.finished and before and after:
        dpo = "reward_accuracy" in before
        what = "DPO loss, reward accuracy, margin" if dpo else "loss (perplexity)"
        table = Table(title=f"held-out {what} in {result.run_dir}")
        table.add_column("category")
        table.add_column("before")
        table.add_column(f"after round {result.rounds_done}")
        categories = [c for c in before["per_category"] if list(before["per_category"]) != ["all"]]  # one category: "all" says it
        rows = [("all", before, after)] + [(c, before["per_category"][c], after["per_category"].get(c, {})) for c in categories]
        for name, b, a in rows:
            table.add_row(name, _eval_cell(b, dpo), _eval_cell(a, dpo))
        out.print(table)
    from fedtune.evaluation.samples import samples_headline

    headline = samples_headline(result.samples_before) if result.finished and result.samples_after else None
    if headline:
        out.print(headline, highlight=False, soft_wrap=True)
    for b, a in zip(result.samples_before, result.samples_after if result.finished else []):
        prompt = b["prompt"] + (f"\n{b['input']}" if b.get("input") else "")
        out.print(f"[bold]prompt:[/] {prompt}", highlight=False)
        out.print(f"  [dim]before:[/] {b['answer']}", highlight=False)
        out.print(f"  [green]after:[/]  {a['answer']}", highlight=False)
    if result.finished and finished_adapter(result.run_dir) is not None:
        out.print(f"adapter (PEFT format): {finished_adapter(result.run_dir)}")
    if result.report is not None:
        out.print(f"report: {result.report}")


def _eval_cell(r: dict, dpo: bool) -> str:
    nan = float("nan")
    if dpo:
        return f"{r.get('loss', nan):.3f}, {r.get('reward_accuracy', nan):.3f}, {r.get('margin', nan):+.3f}"
    return f"{r.get('loss', nan):.3f} ({r.get('ppl', nan):.1f})"


@app.command()
@handle_errors
def validate(args: List[str] = typer.Argument(..., help=CONFIG_ARGS)) -> None:
    """Check a config without loading a model or data."""
    from fedtune.config import dump_yaml

    cfg = _config(*_split_args(args))
    out.print(dump_yaml(cfg), highlight=False)
    out.print("[green]config ok[/]")


@app.command()
@handle_errors
def data(args: List[str] = typer.Argument(..., help=CONFIG_ARGS)) -> None:
    """Load and validate the data, split it, and show examples per client and category."""
    from fedtune.data.partition import category_table
    from fedtune.federation import setup

    cfg = _config(*_split_args(args))
    examples, report = setup.load_data(cfg)
    partition = setup.make_partition(cfg, examples)
    categories = [e.category for e in examples]
    out.print(f"{len(examples)} examples from {report.source} ({report.rows} rows read, {report.skipped} skipped)")
    for reason in report.skipped_reasons:
        out.print(f"  skipped: {reason}", highlight=False)
    counts = category_table(partition.shards + [partition.holdout], categories)
    cats = sorted(set(categories))
    table = Table(title=f"{partition.method} split, seed {cfg.seed}")
    table.add_column("client")
    for c in cats:
        table.add_column(c[:12], justify="right")
    table.add_column("total", justify="right")
    for cid, row in counts.items():
        name = "held-out" if cid == len(partition.shards) else str(cid)
        table.add_row(name, *[str(row.get(c, 0)) for c in cats], str(sum(row.values())))
    out.print(table)


MODEL_FOLDER_HELP = "a run directory, a PEFT adapter folder or a merged model folder (fedtune export)"


@app.command()
@handle_errors
def generate(
    run_dir: Path = typer.Argument(..., help=MODEL_FOLDER_HELP),
    prompt: str = typer.Argument(..., help="instruction to answer"),
    input: str = typer.Option("", "--input", help="optional input/context for the instruction"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    base: bool = typer.Option(False, "--base", help="answer with the base model (adapter disabled)"),
) -> None:
    """Answer one prompt with a run's adapter (or an adapter folder, or a merged model)."""
    import contextlib

    from fedtune.federation.loader import load_any_model
    from fedtune.model.generate import generate as gen
    from fedtune.reporting.progress import LOADING, RichProgress

    progress = RichProgress(err)
    with _interrupted(), progress.phase(LOADING):
        loaded = load_any_model(run_dir)
    kwargs = dict(template=loaded.template, max_new_tokens=max_new_tokens, inputs=[input], progress=progress)
    with _interrupted(), loaded.base_only() if base else contextlib.nullcontext():
        answer = gen(loaded.model, loaded.tokenizer, [prompt], **kwargs)[0]
    out.print(answer, highlight=False, markup=False)


@contextlib.contextmanager
def _interrupted():
    """Ctrl-C in a command that trains nothing: exit 130 without the training resume hint."""
    try:
        yield
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


@app.command()
@handle_errors
def chat(
    run_dir: Path = typer.Argument(..., help="a run directory"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
) -> None:
    """Talk to a run's adapter; replies are streamed. /reset clears the conversation; /exit,
    /quit, Ctrl-D or Ctrl-C at the prompt end the chat; Ctrl-C during a reply stops it."""
    from fedtune.reporting.progress import LOADING, RichProgress
    from fedtune.serving.engine import load_chat_model

    try:
        with RichProgress(err).phase(LOADING):
            model = load_chat_model(run_dir)
    except KeyboardInterrupt:
        return
    history_file = _line_editing()
    err.print(f"chatting with {model.name} ({model.template} template); /reset clears the conversation, "
              "/exit or Ctrl-D ends it, Ctrl-C stops a reply", highlight=False)
    messages: list[dict] = []
    try:
        while True:
            text = input("you> ").strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                messages = []
                err.print("conversation cleared")
                continue
            if text.startswith("/"):
                err.print(f"unknown command {text.split()[0]}; commands: /reset, /exit, /quit", highlight=False)
                continue
            messages.append({"role": "user", "content": text})
            reply = _stream_reply(model, messages, max_new_tokens)
            if reply is None:
                messages.pop()
            else:
                messages.append({"role": "assistant", "content": reply})
    except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt
        out.file.write("\n")
    finally:
        _save_history(history_file)


def _stream_reply(model, messages: list[dict], max_new_tokens: int) -> Optional[str]:
    """Print the model's next turn as it is generated and return it (cut short by Ctrl-C);
    None when the conversation no longer fits the model's context."""
    from fedtune.serving.api import GenRequest, RequestError
    from fedtune.serving.engine import Finish

    req = GenRequest(messages=messages, max_tokens=max_new_tokens)
    try:
        ids = model.prompt_ids(req)
    except RequestError as e:
        err.print(f"{e.message}; /reset starts a new conversation", highlight=False)
        return None
    reply = ""
    out.file.write("model> ")
    try:
        for piece in model.generate(req, ids):
            if not isinstance(piece, Finish):
                reply += piece.text
                out.file.write(piece.text)
                out.file.flush()
    except KeyboardInterrupt:
        out.file.write(" [stopped]")
    out.file.write("\n")
    out.file.flush()
    return reply


def _line_editing() -> Optional[Path]:
    """Line editing and history for ``input()`` (POSIX readline); the history file, if any."""
    try:
        import readline
    except ImportError:  # no readline (Windows): plain input
        return None
    from fedtune.model.base import cache_root

    path = cache_root() / "chat_history"
    readline.set_history_length(1000)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    return path


def _save_history(path: Optional[Path]) -> None:
    if path is None:
        return
    import readline

    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)


@app.command()
@handle_errors
def compare(args: List[str] = typer.Argument(..., help=CONFIG_ARGS)) -> None:
    """Base vs local-only vs federated vs centralized on one partition: train (or reuse) the
    runs, evaluate them alike, write comparison.json and report.html."""
    from fedtune.api import compare as run_compare
    from fedtune.reporting.progress import RichProgress

    native_memory.bound_kernel_caches()  # training (fedtune/native_memory.py)
    cfg = _config(*_split_args(args))
    if cfg.federation.engine == "flower":
        _quiet_flower()
    stop = threading.Event()
    signal.signal(signal.SIGINT, functools.partial(_on_interrupt, stop))
    result = run_compare(cfg, progress=RichProgress(err), stop=stop)
    if result.comparison is None:
        err.print(f"stopped; run `fedtune compare` again with the same config to continue ({result.folder})")
        raise typer.Exit(130)
    from fedtune.federation.rundir import COMPARISON_FILE, REPORT_FILE

    _show_comparison(result.comparison)
    if result.comparison["judge"]:
        _show_judge(result.comparison, result.folder)
    out.print(f"comparison: {result.folder / COMPARISON_FILE}\nreport: {result.folder / REPORT_FILE}")


def _show_comparison(comp: dict) -> None:
    from fedtune.evaluation.gaps import answer_note, gap_lines, with_interval

    models = comp["models"]
    table = Table(title=f"{comp['name']}: held-out loss per category (lower is better)")
    table.add_column("category")
    for m in models:
        table.add_column(m, justify="right")
    heldout = comp["heldout"]
    table.add_row("all", *[f"{heldout[m]['loss']:.3f}" for m in models], style="bold")
    for c in heldout[models[0]]["per_category"]:
        table.add_row(c, *[f"{heldout[m]['per_category'][c]['loss']:.3f}" for m in models])
    out.print(table)
    summary = Table(title="summary")
    bench = [(t, m) for t, ms in (comp.get("harness") or {}).get(models[0], {}).items() for m in ms]  # eval.harness_tasks
    for col in ("model", "loss", "perplexity", "ROUGE-L", "exact match", "steps", *(["judge rel.", "W/T/L"] if comp["judge"] else []),
                *[f"{t} {m}" for t, m in bench]):
        summary.add_column(col, justify="left" if col == "model" else "right")
    for m in models:
        gen, judge = comp["generation"][m], (comp["judge"] or {}).get(m, {})
        extra = []
        if comp["judge"]:
            single, pair = judge.get("single") or {}, judge.get("pairwise") or {}
            rel = single.get("relative")
            extra = [f"{rel:.3f}" if rel is not None else "-", f"{pair.get('win', '-')}/{pair.get('tie', '-')}/{pair.get('loss', '-')}"]
        boot = comp["summary"].get("generation", {}).get(m, {})  # with bootstrap intervals over the answers
        summary.add_row(m, f"{heldout[m]['loss']:.4f}", f"{heldout[m]['ppl']:.2f}", with_interval(boot.get("rouge_l")) if boot
                        else _answer_cell(gen, "rouge_l"), with_interval(boot.get("exact_match")) if boot else _answer_cell(gen, "exact_match"),
                        str(comp["budget"][m]["optimizer_steps"]), *extra,
                        *[_num(comp["harness"][m].get(t, {}).get(k)) for t, k in bench])
    out.print(summary)
    out.print(comp["budget_note"], highlight=False)
    for check, ok in comp["summary"]["ordering"].items():
        out.print(f"  {'[green]yes[/]' if ok else '[red]no[/]'}  {check}")
    for line in gap_lines(comp["summary"].get("gaps") or {}):
        out.print(line, highlight=False, soft_wrap=True)  # one line per gap, however narrow the terminal
    if comp["summary"].get("generation"):
        answered = next(iter(comp["generation"].values()))["examples"]
        out.print(f"ROUGE-L and exact match on {answered} answers per model, with {answer_note(comp)}", highlight=False,
                  soft_wrap=True)


def _answer_cell(gen: dict, key: str) -> str:
    """ROUGE-L / exact match of a generation record; "-" when no answer was scored (eval.generation_examples=0)."""
    return f"{gen[key]:.3f}" if gen.get("examples") else "-"


def _show_judge(comp: dict, folder: Path) -> None:
    """The FedIT judge table: relative score and win/tie/loss against the reference."""
    from fedtune.evaluation.judge_table import HEADERS, cells, fedit_rows, reference_name, unparsed_note
    from fedtune.reporting.report import JUDGE_PLOT

    reference = comp.get("judge_reference") or "data"
    rows = fedit_rows(comp["judge"], comp["judge_reference_ratings"] or [], reference)
    table = Table(title=f"LLM judge against {reference_name(reference)} (FedIT format)")
    for col in HEADERS:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(*cells(r))
    out.print(table)
    out.print(comp["judge_note"], highlight=False)
    note = unparsed_note(rows)
    if note:
        out.print(note, highlight=False, soft_wrap=True)
    out.print(f"judge figure: {folder / JUDGE_PLOT}", soft_wrap=True)


@app.command(name="eval")
@handle_errors
def eval_(
    run_dir: Path = typer.Argument(..., help=MODEL_FOLDER_HELP + " (not a run: --data is needed)"),
    args: List[str] = typer.Argument(None, help="key=value overrides of the run's config (e.g. data.columns.output=response)"),
    data: Optional[str] = typer.Option(None, "--data", help="evaluate on this file (default: the run's held-out set)"),
    base: bool = typer.Option(False, "--base", help="evaluate the base model (adapter disabled)"),
) -> None:
    """Evaluate a run's adapter: held-out loss/perplexity per category, ROUGE-L, exact match."""
    from fedtune.api import evaluate
    from fedtune.reporting.progress import RichProgress

    with _interrupted():
        record = evaluate(run_dir, data=data, base=base, overrides=args or [], progress=RichProgress(err))
    table = Table(title=record["description"])
    for col in ("category", "loss", "perplexity", "ROUGE-L", "exact match"):
        table.add_column(col, justify="left" if col == "category" else "right")
    gen = record["generation"]
    table.add_row("all", f"{record['heldout']['loss']:.4f}", f"{record['heldout']['ppl']:.2f}", _answer_cell(gen, "rouge_l"),
                  _answer_cell(gen, "exact_match"))
    for c, v in record["heldout"]["per_category"].items():
        g = gen["per_category"].get(c)
        table.add_row(c, f"{v['loss']:.4f}", f"{v['ppl']:.2f}", *([f"{g['rouge_l']:.3f}", f"{g['exact_match']:.3f}"] if g else ["-", "-"]))
    out.print(table)
    from fedtune.federation.rundir import EVALUATIONS

    out.print(f"saved: {run_dir / EVALUATIONS / (record['name'] + '.json')}")


@app.command()
@handle_errors
def bench(
    run_dir: Path = typer.Argument(..., help="a run directory"),
    tasks: str = typer.Option(..., "--tasks", help="lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,hellaswag)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="at most N examples per task (a quick look; not a comparable score)"),
    base_too: bool = typer.Option(True, "--base-too/--no-base", help="also evaluate the base model (adapter disabled), side by side"),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="a folder of extra lm-eval task YAMLs (local tasks)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="requests per forward pass"),
) -> None:
    """Standard benchmarks: run lm-evaluation-harness tasks on a run's adapter and its base model
    (needs pip install 'fedtune[harness]'); writes evaluations/harness.json and harness.md."""
    from fedtune.evaluation.harness import bench_run
    from fedtune.federation.rundir import EVALUATIONS, HARNESS_FILE
    from fedtune.reporting.progress import RichProgress

    if not _state["debug"]:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about a model passed as an object
    record = bench_run(run_dir, tasks.split(","), limit=limit, base=base_too, include_path=include_path,
                       batch_size=batch_size, progress=RichProgress(err))
    table = Table(title="lm-evaluation-harness: base model vs adapter")
    for col in ("task", "metric", "base", "adapter", "delta"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for r in record["rows"]:
        table.add_row(r["task"], r["metric"], _num(r["base"]), _num(r["adapter"]), _num(r["delta"], signed=True))
    out.print(table)
    out.print(record["description"], highlight=False)
    out.print(f"saved: {run_dir / EVALUATIONS / HARNESS_FILE}")


def _num(value: Optional[float], signed: bool = False) -> str:
    return "-" if value is None else f"{value:+.4f}" if signed else f"{value:.4f}"


@app.command()
@handle_errors
def report(run_dir: Path = typer.Argument(..., help="a run or comparison directory")) -> None:
    """(Re)write report.html with its plots for a run or a comparison."""
    from fedtune.reporting.report import write_report

    out.print(f"report: {write_report(run_dir)}")


@app.command()
@handle_errors
def serve(
    run_dir: Path = typer.Argument(..., help=MODEL_FOLDER_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (beyond loopback needs --api-key)"),
    port: int = typer.Option(8000, "--port"),
    name: Optional[str] = typer.Option(None, "--name", help="model id to serve (default: the run directory's name)"),
    base: bool = typer.Option(False, "--base", help="serve the base model (adapter disabled)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FEDTUNE_API_KEY", help="require 'Authorization: Bearer KEY'"),
    max_queue: int = typer.Option(16, "--max-queue", help="requests that may wait for the model (more: 429)"),
    max_tokens_limit: Optional[int] = typer.Option(None, "--max-tokens-limit", help="largest max_tokens (default: the context)"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds a client may take to send or read"),
) -> None:
    """Serve a run's adapter on its base model as an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from fedtune.serving import ChatServer, load_chat_model

    try:
        server = ChatServer(None, host, port, api_key=api_key, max_waiting=max_queue, io_timeout=timeout,
                            max_tokens_limit=max_tokens_limit)
    except OSError as e:
        raise FedtuneError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    server.chat = chat = load_chat_model(run_dir, base=base, name=name)
    err.print(f"serving '{chat.name}' at {server.url} (POST /chat/completions, /completions; GET /models); Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ----------------------------------------------------------------------------- fedtune recipes / config

recipes = typer.Typer(pretty_exceptions_show_locals=False, help="The recipes that ship with fedtune: list them, or copy one to edit.")
app.add_typer(recipes, name="recipes")


@recipes.callback(invoke_without_command=True)
@handle_errors
def list_recipes(ctx: typer.Context) -> None:
    """List the bundled recipes; any command that takes a CONFIG accepts a recipe's name."""
    if ctx.invoked_subcommand is not None:
        return
    from fedtune.api import recipes as catalog

    table = Table(title="bundled recipes (`fedtune run NAME`, `fedtune recipes copy NAME` to edit one)")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    for name, text in catalog():
        table.add_row(name, text)
    out.print(table)


@recipes.command("copy")
@handle_errors
def copy_recipe(
    name: str = typer.Argument(..., help="a bundled recipe (`fedtune recipes` lists them)"),
    dest: Optional[Path] = typer.Argument(None, help="file or folder to write (default: ./NAME.yaml); never overwritten"),
) -> None:
    """Write a bundled recipe to a file to edit (refuses to overwrite one)."""
    from fedtune.bundled_recipes import copy

    written = copy(name, dest)
    out.print(f"wrote {written}; run it with: fedtune run {written}", highlight=False)


@app.command("config")
@handle_errors
def show_config(
    args: List[str] = typer.Argument(None, help="[CONFIG] [SECTION] then key=value overrides, e.g. `fedtune config demo lora`"),
) -> None:
    """Print every setting with its value, default and help as commented YAML (a valid config
    file), for the defaults or CONFIG with overrides; SECTION (lora, data.columns ...) limits it."""
    from fedtune.config_doc import is_section, render

    from fedtune.bundled_recipes import names

    path, overrides = _split_args(args or [])
    section = None
    if path is not None and is_section(path) and not Path(path).is_file():
        path, section = None, path
    elif path is not None and not Path(path).is_file() and path not in names() and "/" not in path and not path.endswith(".yaml"):
        render(_config(None, []), path)  # neither a file, a recipe nor a section: the section error names the nearest
    elif path is not None and overrides and "=" not in overrides[0] and not overrides[0].startswith("~"):
        section, overrides = overrides[0], overrides[1:]
    out.print(render(_config(path, overrides), section), end="", markup=False, highlight=False, soft_wrap=True)


@app.command()
@handle_errors
def export(
    run_dir: Path = typer.Argument(..., help="a finished run directory, a PEFT adapter folder or a merged model folder"),
    out_dir: Path = typer.Option(..., "--out", help="folder to write the model into"),
    format: str = typer.Option("hf", "--format", help="hf (safetensors folder: vLLM, transformers) or gguf (llama.cpp, Ollama)"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16; with --format gguf also q8_0"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier export in --out"),
) -> None:
    """Merge a run's adapter into its base model and write it as a full model (with tokenizer and model card)."""
    from fedtune.model.export import export_model
    from fedtune.reporting.progress import RichProgress

    result = export_model(run_dir, out_dir, format=format, dtype=dtype, overwrite=overwrite, progress=RichProgress(err))
    out.print(f"exported: {result.folder} ({', '.join(result.files)})", highlight=False)


# ----------------------------------------------------------------------------- fedtune flower ...

flower = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, help="Run a federation on a Flower deployment (SuperLink + one SuperNode per data owner).")
app.add_typer(flower, name="flower")


@flower.command("run")
@handle_errors
def run_deployed(
    args: List[str] = typer.Argument(..., help=CONFIG_ARGS),
    superlink: str = typer.Option(..., "--superlink", help="the SuperLink's address, host:port"),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", help="CA certificate of a TLS SuperLink (ca.crt)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS (a local try-out only)"),
    resume: bool = typer.Option(False, "--resume", help="continue output.dir (on the server) from its last checkpoint"),
) -> None:
    """Start the run with `flwr run` and follow its log until it ends."""
    from fedtune.federation.flower.deploy import COMPLETED, flwr_run

    cfg = _config(*_split_args(args))
    status = flwr_run(cfg, superlink, resume=resume, insecure=insecure, root_certificates=root_certificates, echo=_echo_flower)
    _flower_finished(status, COMPLETED)


@flower.command("app")
@handle_errors
def write_app(
    args: List[str] = typer.Argument(..., help=CONFIG_ARGS),
    out_dir: Path = typer.Option(..., "--out", help="folder to write the Flower App (pyproject.toml) into"),
    resume: bool = typer.Option(False, "--resume", help="the app resumes output.dir instead of starting it"),
) -> None:
    """Write a Flower App for `flwr run APP_DIR CONNECTION` (the config travels inside it)."""
    from fedtune.federation.flower.deploy import write_app as write

    write(_config(*_split_args(args)), out_dir, resume)
    out.print(f"Flower App written to {out_dir}; start it with: flwr run {out_dir} <superlink connection> --stream", highlight=False)


@flower.command("local")
@handle_errors
def run_local(
    args: List[str] = typer.Argument(..., help=CONFIG_ARGS),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="where the processes' logs go (default: a temporary folder)"),
) -> None:
    """Try the deployment runtime on this machine: a SuperLink and one SuperNode per client
    (each with --node-config partition-id=N) on 127.0.0.1, then the run, then shut down."""
    from fedtune.federation.flower.deploy import COMPLETED, flwr_run
    from fedtune.federation.flower.localnet import LocalDeployment

    cfg = _config(*_split_args(args))
    with tempfile.TemporaryDirectory(prefix="fedtune-local-") as tmp:
        nodes = [{"partition-id": i} for i in range(cfg.partition.num_clients)]
        with LocalDeployment(workdir or Path(tmp), nodes) as net:
            err.print(f"SuperLink on {net.superlink}, {len(nodes)} SuperNodes; logs in {net.workdir}", highlight=False)
            status = flwr_run(cfg, net.superlink, insecure=True, echo=_echo_flower)
    _flower_finished(status, COMPLETED)


@flower.command("worker")
@handle_errors
def run_worker(
    runtime_api: str = typer.Option("127.0.0.1:9094", "--runtime-api", help="the SuperNode's Runtime API, host:port (its --port; Flower's default 9094)"),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", help="CA certificate of a TLS Runtime API (the SuperNode's --ssl-ca-certfile); none: plain HTTP"),
) -> None:
    """Run every ClientApp task of a SuperNode started with `--isolation process` in this one
    process, which keeps the base model and tokenised data between rounds. Runs until stopped."""
    from fedtune.federation.flower.node_worker import serve

    native_memory.bound_kernel_caches()  # training (fedtune/native_memory.py)
    _quiet_flower()
    err.print(f"serving the SuperNode's ClientApp tasks on {runtime_api}", highlight=False)
    try:
        serve(runtime_api, insecure=root_certificates is None, root_certificates_path=None if root_certificates is None else str(root_certificates))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _echo_flower(line: str) -> None:
    err.print(line, markup=False, highlight=False)


def _flower_finished(status: dict, completed: str) -> None:
    if status.get("status") != completed:
        raise FederationError(f"the Flower run ended {status.get('status')}: {status.get('status-details')}; see the log above")
    out.print(f"run {status['run-id']} {status['status']} in {status['elapsed']:.0f}s", highlight=False)


def main() -> None:
    app(prog_name="fedtune")


if __name__ == "__main__":
    sys.exit(main())
