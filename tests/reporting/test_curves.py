import json

from fedtune.reporting.curves import plot_eval


def test_plots_every_numeric_eval_metric(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"type": "eval", "round": r, "loss": 0.7 - 0.1 * r, "reward_accuracy": 0.5 + 0.1 * r, "margin": 0.2 * r, "examples": 50, "per_category": {}}
        for r in range(3)
    ] + [{"type": "round", "round": 1, "seconds": 1.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_eval(metrics, tmp_path / "eval.png")
    assert out == tmp_path / "eval.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_to_plot_without_evaluations(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"type": "round", "round": 1}) + "\n")
    assert plot_eval(metrics, tmp_path / "eval.png") is None and not (tmp_path / "eval.png").exists()
