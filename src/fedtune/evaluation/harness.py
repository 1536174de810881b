"""Standard benchmarks through lm-evaluation-harness (``lm-eval``, the optional extra
``fedtune[harness]``): ``fedtune bench RUN_DIR --tasks ...`` and the harness columns of
``fedtune compare`` (``eval.harness_tasks``).

The model is the one fedtune already loaded (the run's base model wrapped with LoRA): lm-eval's
``HFLM`` takes a model instance, so the bundled base works offline and the base model is
measured with the adapter disabled, on the same weights, tokenizer and device. Task datasets
come from the Hugging Face hub (or from local task YAMLs in ``include_path``).

A result row is ``(task, metric, base, adapter, delta)``; metric names are lm-eval's with its
default filter dropped (``acc,none`` -> ``acc``; ``exact_match,strict-match`` ->
``exact_match/strict-match``). Standard errors are kept beside the values in the JSON.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import time
from pathlib import Path
from typing import Optional, Sequence

from fedtune.errors import ConfigError, DataError
from fedtune.federation.rundir import EVALUATIONS, HARNESS_FILE, HARNESS_TABLE
from fedtune.reporting.progress import HARNESS, Progress
from fedtune.types import Adapter

INSTALL_HINT = "pip install 'fedtune[harness]'"
_SKIP_KEYS = ("alias", "name", "sample_len", "samples")


def require_lm_eval() -> None:
    """ConfigError (one line naming the install command) when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(f"standard benchmarks need lm-evaluation-harness, which is not installed; {INSTALL_HINT}") from None


def load_tasks(tasks: Sequence[str], include_path: Optional[str | Path] = None) -> tuple[object, list[str]]:
    """(lm-eval task index, task names): the names checked against lm-eval's built-in tasks plus
    the YAML tasks under ``include_path`` (ConfigError naming the unknown ones). When the local
    tasks are all that is asked for, the built-in index (seconds to build) is skipped."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise ConfigError("harness tasks: none given; name lm-eval tasks, e.g. --tasks arc_easy,hellaswag")
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"harness include path {include_path}: not a folder; pass a folder of lm-eval task YAMLs")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in names):
            return local, names
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        hints = [f"{t} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(t, known, n=1)) else t for t in unknown]
        raise ConfigError(f"harness tasks: unknown {', '.join(hints)}; list them with `lm-eval ls tasks`, or add local "
                          "task YAMLs with --include-path (eval.harness_include_path)")
    return manager, names


def split_metric(key: str) -> str:
    """lm-eval's ``metric,filter`` key as one name (``acc,none`` -> ``acc``)."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def flatten_results(results: dict) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(values, standard errors) per task and metric from ``simple_evaluate(...)["results"]``."""
    values: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key in _SKIP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric = split_metric(key)
            if "_stderr" in metric:
                errors.setdefault(task, {})[metric.replace("_stderr", "")] = float(value)
            else:
                values.setdefault(task, {})[metric] = float(value)
    return values, errors


def side_by_side(adapter: dict[str, dict[str, float]], base: Optional[dict[str, dict[str, float]]]) -> list[dict]:
    """Rows ``{task, metric, base, adapter, delta}`` (base and delta None without a base run)."""
    rows = []
    for task, metrics in adapter.items():
        for metric, value in metrics.items():
            b = (base or {}).get(task, {}).get(metric)
            rows.append({"task": task, "metric": metric, "base": b, "adapter": value, "delta": None if b is None else value - b})
    return rows


def evaluate(model, tokenizer, manager, tasks: Sequence[str], *, limit: Optional[int], batch_size: int) -> dict:
    """``{"values", "stderr", "samples"}`` of lm-eval's ``simple_evaluate`` on ``model`` as it is
    now (adapter enabled or not is the caller's choice)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False)
    except ConnectionError as err:  # datasets' offline/unreachable hub errors derive from it
        raise DataError(f"harness tasks {', '.join(tasks)}: a dataset could not be fetched ({err}); "
                        "connect to the Hugging Face hub once (datasets are cached) or use local tasks") from None
    values, stderr = flatten_results(out["results"])
    return {"values": values, "stderr": stderr, "samples": out.get("n-samples", {})}


def evaluate_adapter(bundle, adapter: Optional[Adapter], manager, tasks: Sequence[str], *, limit: Optional[int],
                     batch_size: int, progress: Optional[Progress] = None) -> dict:
    """:func:`evaluate` with ``adapter`` loaded into the bundle, or the base model (LoRA
    disabled) when ``adapter`` is None; ``progress`` sees it as a phase."""
    from fedtune.model.lora import set_adapter

    if adapter is not None:
        set_adapter(bundle.params, adapter)
    with bundle.model.disable_adapter() if adapter is None else contextlib.nullcontext(), (progress or Progress()).phase(HARNESS):
        return evaluate(bundle.model, bundle.tokenizer, manager, tasks, limit=limit, batch_size=batch_size)


def bench_run(run_dir: Path, tasks: Sequence[str], *, limit: Optional[int] = None, base: bool = True,
              include_path: Optional[str | Path] = None, batch_size: int = 8, progress: Optional[Progress] = None) -> dict:
    """Run lm-eval ``tasks`` on a run's adapter (and, with ``base``, on the base model with the
    adapter disabled); write ``evaluations/harness.json`` and ``harness.md`` (the side-by-side
    table) in the run directory and return the record."""
    from fedtune.federation import setup

    progress = progress or Progress()
    run_dir = Path(run_dir)
    manager, names = load_tasks(tasks, include_path)
    cfg, bundle, folder = setup.load_run_model(run_dir)
    runs = {}
    for which in (["base"] if base else []) + ["adapter"]:
        progress.message(f"bench: {which} on {', '.join(names)}" + (f" (limit {limit})" if limit else ""))
        started = time.perf_counter()
        with bundle.model.disable_adapter() if which == "base" else contextlib.nullcontext(), progress.phase(HARNESS):
            runs[which] = evaluate(bundle.model, bundle.tokenizer, manager, names, limit=limit, batch_size=batch_size)
        progress.message(f"bench: {which} done in {time.perf_counter() - started:.1f}s")
    import lm_eval

    record = {
        "name": "harness",
        "kind": "harness",
        "description": f"lm-evaluation-harness {getattr(lm_eval, '__version__', '?')} on {cfg.model.name}: adapter {folder}"
                       + (" vs the base model (adapter disabled)" if base else "") + (f"; at most {limit} examples per task" if limit else ""),
        "tasks": names,
        "limit": limit,
        "adapter": str(folder),
        "rows": side_by_side(runs["adapter"]["values"], runs.get("base", {}).get("values")),
        "stderr": {w: r["stderr"] for w, r in runs.items()},
        "samples": runs["adapter"]["samples"],
    }
    out = run_dir / EVALUATIONS
    out.mkdir(exist_ok=True)
    (out / HARNESS_FILE).write_text(json.dumps(record, indent=1))
    (out / HARNESS_TABLE).write_text(markdown_table(record["rows"]))
    return record


def _cell(value: Optional[float], signed: bool = False) -> str:
    return "-" if value is None else (f"{value:+.4f}" if signed else f"{value:.4f}")


def markdown_table(rows: list[dict]) -> str:
    """The side-by-side table as Markdown (``harness.md``)."""
    lines = ["| task | metric | base | adapter | delta |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['task']} | {r['metric']} | {_cell(r['base'])} | {_cell(r['adapter'])} | {_cell(r['delta'], True)} |" for r in rows]
    return "\n".join(lines) + "\n"
