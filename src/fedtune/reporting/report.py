"""``report.html`` for a run directory or a comparison directory, with its PNG figures.

A run report reads ``config.yaml``, ``metrics.jsonl`` and ``partition.json``; a comparison
report reads ``comparison.json`` (written by ``fedtune compare``). Both are rebuilt from those
files alone, so ``fedtune report DIR`` can redraw them at any time.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fedtune.config import load_config
from fedtune.errors import CheckpointError
from fedtune.federation.rundir import COMPARISON_FILE, CONFIG_FILE, EVALUATIONS, METRICS_FILE, PARTITION_FILE, REPORT_FILE
from fedtune.reporting import html as h
from fedtune.reporting import plots
from fedtune.reporting.metrics import read_metrics

JUDGE_PLOT = "judge.png"
REPORTED_SAMPLES = 16  # sample answers shown side by side (comparison.json keeps them all)


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (and its PNGs); a comparison report if the folder holds
    ``comparison.json``. Returns the report's path."""
    run_dir = Path(run_dir)
    if (run_dir / COMPARISON_FILE).is_file():
        return comparison_report(run_dir, json.loads((run_dir / COMPARISON_FILE).read_text()))
    if not (run_dir / METRICS_FILE).is_file():
        raise CheckpointError(f"{run_dir} holds neither {METRICS_FILE} nor {COMPARISON_FILE}; pass a run or compare directory")
    return run_report(run_dir)


# ----------------------------------------------------------------------------- one run


def run_report(run_dir: Path) -> Path:
    records = list(read_metrics(run_dir / METRICS_FILE))
    evals = [r for r in records if r["type"] == "eval"]
    fits = [r for r in records if r["type"] == "fit"]
    rounds = [(r["round"], r["clients"]) for r in records if r["type"] == "round"]
    samples = [r for r in records if r["type"] == "samples"]
    partition = _read_json(run_dir / PARTITION_FILE)
    cfg = load_config(run_dir / CONFIG_FILE)
    mode = cfg.federation.mode
    sections = [h.section("summary", h.table(["", "value"], _run_summary(evals, fits, rounds, mode)))]
    if evals:
        curve = [(e["round"], e["loss"]) for e in evals]
        thin = {c: [(e["round"], e["per_category"][c]["loss"]) for e in evals if c in e["per_category"]] for c in evals[0]["per_category"]}
        plots.loss_curves({"all categories": curve}, run_dir / "loss_per_round.png", thin=thin)
        first, last = evals[0], evals[-1]
        bars = {f"round {first['round']}": _per_cat(first), f"round {last['round']}": _per_cat(last)}
        plots.category_bars(bars, run_dir / "loss_per_category.png", ylabel="held-out loss", title="held-out loss per category")
        sections.append(h.section(
            "held-out loss",
            h.figure("loss_per_round.png", "held-out loss per round (thick: all categories; thin: each category)"),
            h.figure("loss_per_category.png", "held-out loss per category, before and after training (the axis does not start at 0)"),
            _category_table({"before": first, "after": last}),
        ))
    federated = [r for r in records if r["type"] == "federated_eval" and r.get("loss") is not None]
    if federated:
        sections.append(_federated_section(federated))
    if evals and "epsilon" in evals[-1]:
        sections.append(_privacy_section(run_dir, evals, cfg))
    if rounds and partition:
        plots.participation(rounds, int(partition["num_clients"]), run_dir / "participation.png")
        sections.append(h.section("client participation", h.figure("participation.png", "clients that trained in each round")))
    if partition:
        plots.partition_histogram(partition["categories"], run_dir / "partition.png")
        sections.append(h.section(
            "partition",
            h.figure("partition.png", f"{partition['method']} split: examples per client per category "
                     f"({len(partition['holdout'])} rows held out for evaluation)"),
        ))
    if len(samples) >= 2:
        before, after = samples[0], samples[-1]
        rows = [(h.pre(_prompt(b)), h.pre(b.get("reference") or ""), h.pre(b["answer"]), h.pre(a["answer"]))
                for b, a in zip(before["items"], after["items"])]
        from fedtune.evaluation.samples import samples_headline

        headline = samples_headline(before["items"])
        sections.append(h.section("sample answers", h.note(headline) if headline else "",
                                  h.table(["prompt", "reference", f"round {before['round']}", f"round {after['round']}"], rows)))
    sections.extend(_evaluations(run_dir))
    subtitle = f"{mode} run of {cfg.model.name} on {cfg.data.path}, {cfg.partition.num_clients} clients, {cfg.strategy.name}"
    return _write(run_dir, h.page(f"fedtune run: {run_dir.name}", subtitle, sections))


def _run_summary(evals: list, fits: list, rounds: list, mode: str) -> list[tuple]:
    rows: list[tuple] = [("mode", mode), ("rounds done", len(rounds)), ("client fits", len(fits)),
                         ("optimizer steps (all clients)", sum(int(f.get("steps", 0)) for f in fits)),
                         ("response tokens trained on", sum(int(f.get("tokens", 0)) for f in fits)),
                         ("training seconds", round(sum(float(f.get("seconds", 0.0)) for f in fits), 1))]
    if evals:
        rows += [(f"held-out loss, round {evals[0]['round']}", evals[0]["loss"]),
                 (f"held-out loss, round {evals[-1]['round']}", evals[-1]["loss"])]
        if "ppl" in evals[-1]:  # SFT (a DPO evaluation has a loss but no perplexity)
            rows.append((f"held-out perplexity, round {evals[-1]['round']}", evals[-1]["ppl"]))
    return rows


def _federated_section(lines: list) -> str:
    """Federated evaluation (eval.federated): the clients' own held-out rows, weighted over clients."""
    rows = [(r["round"], r["loss"], r.get("ppl", r.get("reward_accuracy")), r["examples"], len(r["clients"]), len(r.get("failed", [])))
            for r in lines]
    second = "perplexity" if "ppl" in lines[-1] else "reward accuracy"
    note = ("each evaluating client scores the global adapter on its own held-out rows (eval.client_holdout of its data, never "
            "trained on); the loss is weighted over all their rows (tokens for SFT, pairs for DPO)")
    return h.section("federated evaluation", h.note(note),
                     h.table(["round", "loss", second, "examples", "clients", "failed"], rows),
                     _category_table({f"round {lines[0]['round']}": lines[0], f"round {lines[-1]['round']}": lines[-1]}))


def _privacy_section(run_dir: Path, evals: list, cfg) -> str:
    """Epsilon per round next to held-out loss (privacy.dp runs)."""
    private = [e for e in evals if "epsilon" in e]
    delta = private[-1]["delta"]
    plots.privacy_curves([(e["round"], e["loss"]) for e in private], [(e["round"], e["epsilon"]) for e in private],
                         delta, run_dir / "privacy.png")
    p = cfg.privacy
    note = (f"client-level DP-FedAvg, {p.dp} noise: clip norm C={p.clip_norm:g}, noise multiplier z={p.noise_multiplier:g}; "
            f"epsilon at delta={delta:g} after round {private[-1]['round']}: {private[-1]['epsilon']:.4g}"
            + (f" (target {p.target_epsilon:g})" if p.target_epsilon is not None else "") + "; see SECURITY.md for what it covers")
    return h.section("privacy", h.note(note), h.figure("privacy.png", "held-out loss and epsilon spent per round"))


def _evaluations(run_dir: Path) -> list[str]:
    """Tables of ``fedtune eval`` results saved in the run directory."""
    out = []
    for path in sorted((run_dir / EVALUATIONS).glob("*.json")):
        ev = json.loads(path.read_text())
        if ev.get("kind") == "harness":  # `fedtune bench`: lm-evaluation-harness, base vs adapter
            rows = [(r["task"], r["metric"], r["base"], r["adapter"], r["delta"]) for r in ev["rows"]]
            out.append(h.section("standard benchmarks (lm-evaluation-harness)", h.note(ev["description"]),
                                 h.table(["task", "metric", "base", "adapter", "delta"], rows)))
            continue
        scored = bool(ev["generation"].get("examples"))  # no answers: a dash, not 0.000
        rows = [("all", ev["heldout"]["loss"], ev["heldout"]["ppl"], ev["generation"]["rouge_l"] if scored else None,
                 ev["generation"]["exact_match"] if scored else None)]
        gen = ev["generation"]["per_category"]
        rows += [(c, v["loss"], v["ppl"], gen.get(c, {}).get("rouge_l"), gen.get(c, {}).get("exact_match"))
                 for c, v in ev["heldout"]["per_category"].items()]
        out.append(h.section(f"evaluation: {ev['name']}", h.note(ev["description"]),
                             h.table(["category", "loss", "perplexity", "ROUGE-L", "exact match"], rows)))
    return out


# ----------------------------------------------------------------------------- comparison


def comparison_report(folder: Path, comp: dict) -> Path:
    models = comp["models"]
    checks = [(name, "yes" if ok else "no") for name, ok in comp.get("summary", {}).get("ordering", {}).items()]
    sections = [h.section("summary", h.note(comp["budget_note"]), summary_table(comp),
                          h.table(["FedIT ordering on held-out loss", "holds"], checks) if checks else "", *gaps_parts(comp))]
    plots.loss_curves({m: comp["curves"][m] for m in models if comp["curves"].get(m)}, folder / "loss_per_round.png", dashed=["base"])
    per_cat = {m: _per_cat(comp["heldout"][m]) for m in models}
    plots.category_bars(per_cat, folder / "loss_per_category.png", ylabel="held-out loss", title="held-out loss per category")
    figs = [h.figure("loss_per_round.png", "held-out loss per round of each trained model (dashed: the base model)"),
            h.figure("loss_per_category.png", "held-out loss per category (lower is better; the axis does not start at 0)")]
    if comp["generation"]:
        rouge = {m: {c: v["rouge_l"] for c, v in comp["generation"][m]["per_category"].items()} for m in models}
        plots.category_bars(rouge, folder / "rouge_per_category.png", ylabel="ROUGE-L F", title="ROUGE-L per category")
        figs.append(h.figure("rouge_per_category.png", "ROUGE-L per category (higher is better)"))
    sections.append(h.section("per category", *figs, _category_table(comp["heldout"])))
    if comp.get("participation"):
        plots.participation(comp["participation"], comp["partition"]["num_clients"], folder / "participation.png")
        sections.append(h.section("client participation (federated run)", h.figure("participation.png", "clients that trained in each round")))
    plots.partition_histogram(comp["partition"]["categories"], folder / "partition.png")
    sections.append(h.section("partition", h.figure("partition.png", f"{comp['partition']['method']} split, shared by every compared run")))
    if comp.get("judge"):
        sections.append(h.section("LLM judge", h.note(comp["judge_note"]), *judge_parts(comp, folder)))
    if comp["samples"]:
        rows = [(h.pre(_prompt(s)), h.pre(s["reference"]), *[h.pre(s["answers"][m]) for m in models]) for s in comp["samples"][:REPORTED_SAMPLES]]
        sections.append(h.section("sample answers", h.table(["prompt", "reference", *models], rows)))
    return _write(folder, h.page(f"fedtune comparison: {folder.name}", comp["description"], sections))


def summary_table(comp: dict) -> str:
    rows = []
    boot = comp.get("summary", {}).get("generation") or {}  # intervals over the answers, when recorded
    for m in comp["models"]:
        gen = comp["generation"].get(m, {})
        budget = comp["budget"].get(m, {})
        ci = [_interval(boot[m].get("rouge_l")), _interval(boot[m].get("exact_match"))] if m in boot else []
        scored = bool(gen.get("examples"))  # no answers (eval.generation_examples=0): a dash, not 0.000
        rows.append((m, comp["heldout"][m]["loss"], comp["heldout"][m]["ppl"], gen.get("rouge_l") if scored else None,
                     gen.get("exact_match") if scored else None, *ci,
                     budget.get("optimizer_steps", 0), budget.get("tokens", 0)))
    level = f"{100 * comp['summary']['gaps']['level']:g}% " if boot else ""
    headers = ["model", "held-out loss", "perplexity", "ROUGE-L", "exact match",
               *([f"ROUGE-L {level}interval", f"exact match {level}interval"] if boot else []), "optimizer steps", "tokens trained"]
    return h.table(headers, rows, best={1: "min", 2: "min", 3: "max", 4: "max"})


def gaps_parts(comp: dict) -> list[str]:
    """The held-out loss gaps with their paired bootstrap intervals (evaluation/gaps.py)."""
    from fedtune.evaluation.gaps import gap_lines, verdict

    gaps = comp.get("summary", {}).get("gaps") or {}
    if not gaps.get("gaps"):
        return []
    rows = [(g["name"], g["value"], g["low"], g["high"], verdict(g)) for g in gaps["gaps"]]
    parts = [h.note(gap_lines(gaps)[0]), h.table(["gap in held-out loss (nats)", "value", "low", "high", ""], rows)]
    if gaps.get("fraction"):
        parts.append(h.note(gap_lines(gaps)[-1].strip()))
    return parts


def judge_parts(comp: dict, folder: Path) -> list[str]:
    """The FedIT judge table (relative score, win/tie/loss against the reference) and its
    figure ``judge.png``, with a note when judgements could not be parsed."""
    from fedtune.evaluation.judge_table import HEADERS, cells, fedit_rows, reference_name, unparsed_note

    reference = comp.get("judge_reference", "data")
    rows = fedit_rows(comp["judge"], comp.get("judge_reference_ratings") or [], reference)
    plots.judge_chart(rows, folder / JUDGE_PLOT, reference=reference_name(reference))
    note = unparsed_note(rows)
    return [h.figure(JUDGE_PLOT, "relative score (sum of the model's ratings / the reference's; dashed: 100%) and "
                     "wins/ties/losses against the reference, as in FedIT"),
            h.table(list(HEADERS), [cells(r) for r in rows]), h.note(note) if note else ""]


def typical_local(values: dict[str, float]) -> float | None:
    """The median over local-only clients (``local-<id>`` keys) of a per-model value."""
    local = [v for k, v in values.items() if k.startswith("local-")]
    return statistics.median(local) if local else None


# ----------------------------------------------------------------------------- helpers


def _interval(est: dict | None) -> str:
    return "-" if not est or est["low"] != est["low"] else f"[{est['low']:.3f}, {est['high']:.3f}]"


def _per_cat(ev: dict) -> dict[str, float]:
    return {c: v["loss"] for c, v in ev["per_category"].items()}


def _category_table(evals: dict[str, dict]) -> str:
    names = list(evals)
    cats = sorted({c for ev in evals.values() for c in ev["per_category"]})
    rows = [("all", *[evals[n]["loss"] for n in names])]
    rows += [(c, *[evals[n]["per_category"].get(c, {}).get("loss") for n in names]) for c in cats]
    return h.table(["category (held-out loss)", *names], rows)


def _prompt(item: dict) -> str:
    return item["prompt"] + (f"\n\n{item['input']}" if item.get("input") else "")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(folder: Path, text: str) -> Path:
    path = folder / REPORT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
