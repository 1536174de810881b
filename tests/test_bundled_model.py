"""Integration: the real CLI on the bundled SmolLM2-135M-Instruct (about a minute on 2 CPU cores)."""

import json

import pytest

from tests.test_cli import fedtune


@pytest.mark.slow
def test_demo_recipe_on_the_bundled_model(tmp_path, tokenizer_dir):
    run_dir = tmp_path / "demo"
    proc = fedtune(
        "run", "configs/demo.yaml", f"output.dir={run_dir}",
        "federation.rounds=2", "federation.clients_per_round=2", "train.local_steps=3",
        "partition.holdout_per_category=2", "eval.num_samples=1", "eval.max_new_tokens=12",
    )
    assert proc.returncode == 0, proc.stderr
    evals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert "before:" in proc.stdout and "after:" in proc.stdout

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tokenizer_dir), run_dir / "adapter")
    ids = tok.apply_chat_template([{"role": "user", "content": "What sound does a cow make?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
