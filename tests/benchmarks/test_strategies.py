import json

from benchmarks.strategies import ENTRIES, main


def test_quick_benchmark_writes_json_table_and_plot(tiny_model_dir, tmp_path):
    results = main(["--quick", "--model", str(tiny_model_dir), "--only", "fedavg,fedavg+krum", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")])

    saved = json.loads((tmp_path / "strategies-quick.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [e["name"] for e in saved["entries"]] == ["fedavg", "fedavg+krum"]
    for e in saved["entries"]:
        assert e["rounds"] == [0, 1, 2] and len(e["heldout_loss"]) == 3
    assert saved["entries"][1]["aggregator"] == "krum" and saved["entries"][1]["params"] == {"krum_f": 1}
    assert saved["entries"][0]["heldout_loss"][0] == saved["entries"][1]["heldout_loss"][0]  # the same starting point
    assert (tmp_path / "strategies-quick.png").stat().st_size > 0
    assert "| fedavg+krum |" in (tmp_path / "strategies-quick.md").read_text()


def test_every_strategy_has_an_entry():
    from fedtune.config import STRATEGIES

    assert {name for name, _, _ in ENTRIES if "+" not in name} == set(STRATEGIES)
