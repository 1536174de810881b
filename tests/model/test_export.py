"""fedtune export: the merged hf folder reloads in plain transformers (fresh process, no fedtune,
offline) with the same greedy answers as `fedtune generate`; GGUF files load back through
transformers' GGUF loader (which undoes llama.cpp's Q/K permutation) with the same greedy tokens
and the metadata llama.cpp reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtune.config import load_config
from fedtune.errors import CheckpointError, ConfigError
from fedtune.federation.loader import load_any_model
from fedtune.model.export import export_model
from fedtune.model.generate import generate
from fedtune.model.gguf_export import permute_rotary
from fedtune.reporting.progress import Progress
from tests.tolerance import close

PROMPTS = ["Name a color.", "What is 2 + 3?", "Give the plural of mouse."]
N_TOKENS = 8  # greedy tokens compared per prompt


class Recorder(Progress):
    def __init__(self):
        self.lines = []

    def message(self, text: str) -> None:
        self.lines.append(text)


@pytest.fixture(scope="module")
def lively_run(tmp_path_factory, tokenizer) -> Path:
    """A finished run on a tiny untied Llama whose random weights are large enough that greedy
    answers differ from token to token (the conftest model answers newlines only)."""
    from fedtune.federation.inprocess import run
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lively")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(1)
        LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    overrides = [
        f"model.name={root / 'base'}", "data.demo_per_category=10", "data.max_length=48", "partition.num_clients=2",
        "partition.holdout_per_category=1", "federation.rounds=1", "train.local_steps=2", "train.lr=0.01",
        "eval.num_samples=1", "eval.max_new_tokens=2", "eval.generation_examples=2", "output.report=false",
        f"output.dir={root / 'run'}",
    ]
    run(load_config(None, overrides))
    return root / "run"


def fedtune_answers(folder: Path) -> list[str]:
    loaded = load_any_model(folder)
    return generate(loaded.model, loaded.tokenizer, PROMPTS, template=loaded.template, max_new_tokens=N_TOKENS)


PLAIN_TRANSFORMERS = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
answers = []
for p in prompts:
    text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
print(json.dumps({"answers": answers, "fedtune": "fedtune" in sys.modules}))
"""


def test_hf_export_reloads_in_plain_transformers_with_the_same_answers(lively_run, tmp_path):
    progress = Recorder()
    result = export_model(lively_run, tmp_path / "hf", format="hf", dtype="float32", progress=progress)

    assert [line.split()[0] for line in progress.lines] == ["loading", "merging", "writing", "exported"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "fedtune.json"):
        assert (result.folder / name).is_file(), name
    assert json.loads((result.folder / "fedtune.json").read_text())["kind"] == "merged"
    assert "library_name: transformers" in (result.folder / "README.md").read_text()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no fedtune on the path
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(result.folder), json.dumps(PROMPTS), str(N_TOKENS)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = fedtune_answers(lively_run)
    assert not reloaded["fedtune"]
    assert len(set(expected)) > 1 and all(expected)  # answers that can tell models apart
    assert reloaded["answers"] == expected
    assert fedtune_answers(result.folder) == expected  # fedtune generate on the merged folder too


def greedy_ids(model, tokenizer) -> list[list[int]]:
    out = []
    for prompt in prompt_ids_of(tokenizer):
        ids = torch.tensor([prompt])
        gen = model.generate(ids, max_new_tokens=N_TOKENS, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


# q8_0: per block of 32 weights an f16 scale d = absmax/127 and int8 codes: error <= d/2 (the
# rounding) + 127 * |d - f16(d)| (the scale's own rounding, <= absmax * 2**-11) = absmax * 0.0044
WEIGHT_REL = {"float32": 0.0, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "q8_0": 1 / 200}


@pytest.fixture(scope="module")
def hf_export(lively_run, tmp_path_factory) -> Path:
    return export_model(lively_run, tmp_path_factory.mktemp("hf") / "hf", format="hf").folder


# of the largest |logit|. The tiny random model (init 0.3) amplifies weight rounding a lot:
# measured 0.006 (f16), 0.047 (bf16), 0.18 (q8_0). The weight checks carry the precision; this
# one catches layout errors (a wrong Q/K permutation moves logits by about their own size).
LOGIT_REL = {"float32": 0.0, "float16": 0.03, "bfloat16": 0.25, "q8_0": 0.5}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "q8_0"])
def test_gguf_export_loads_back_with_the_same_greedy_tokens(lively_run, hf_export, tmp_path, dtype):
    """f32: bit-equal weights and the same N_TOKENS greedy tokens. f16/bf16/q8_0: weights and
    logits within the format's rounding, and the same greedy tokens up to the first position
    where the float32 model's top two logits are closer than twice the logits' deviation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = export_model(lively_run, tmp_path / "gguf", format="gguf", dtype=dtype)
    (name,) = result.files
    assert (result.folder / name).is_file() and (result.folder / "README.md").is_file()
    reference = AutoModelForCausalLM.from_pretrained(hf_export)
    model = AutoModelForCausalLM.from_pretrained(result.folder, gguf_file=name, dtype=torch.float32)

    ref_state, state = reference.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    for key in ref_state:  # each weight within its format's rounding of its own magnitude (f32: bit-equal)
        assert close(state[key].float(), ref_state[key], WEIGHT_REL[dtype]), key
    tokenizer = AutoTokenizer.from_pretrained(hf_export)
    want, got = greedy_ids(reference, tokenizer), greedy_ids(model, tokenizer)
    if dtype == "float32":
        assert got == want
        return
    for prompt_ids, w, g in zip(prompt_ids_of(tokenizer), want, got):
        full = torch.tensor([prompt_ids + w])
        with torch.no_grad():
            ref_logits, logits = reference(full).logits[0, len(prompt_ids) - 1 : -1], model(full).logits[0, len(prompt_ids) - 1 : -1]
        assert close(logits, ref_logits, LOGIT_REL[dtype])  # (N_TOKENS, V)
        first = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), None)
        if first is not None:
            top2 = ref_logits[first].topk(2).values
            assert top2[0] - top2[1] <= 2 * (logits[first] - ref_logits[first]).abs().max(), (first, w, g)


def prompt_ids_of(tokenizer) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_gguf_tokenizer_loads_back_the_same(lively_run, hf_export, tmp_path):
    from transformers import AutoTokenizer

    result = export_model(lively_run, tmp_path / "gguf", format="gguf", dtype="float16")
    loaded, original = AutoTokenizer.from_pretrained(result.folder, gguf_file=result.files[0]), AutoTokenizer.from_pretrained(hf_export)
    assert prompt_ids_of(loaded) == prompt_ids_of(original)
    assert loaded.chat_template == original.chat_template and loaded.eos_token_id == original.eos_token_id


def test_gguf_metadata_is_what_llama_cpp_reads(lively_run, tmp_path, tokenizer):
    import gguf

    result = export_model(lively_run, tmp_path / "gguf", format="gguf", dtype="q8_0")
    reader = gguf.GGUFReader(str(result.folder / result.files[0]))
    field = lambda key: reader.fields[key].contents()  # noqa: E731

    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == (2, 64, 128)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv"), field("llama.rope.dimension_count")) == (4, 2, 16)
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = field("tokenizer.ggml.token_type")
    assert types[1] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert len(field("tokenizer.ggml.merges")) > 40000
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0 and kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_rotary_permutation_is_llama_cpp_s():
    # one head of dim 4: HF rows (x0, x1 | y0, y1) -> llama.cpp's interleaved (x0, y0, x1, y1)
    w = torch.arange(8.0).reshape(4, 2)
    assert permute_rotary(w, 1).tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]
    assert torch.equal(permute_rotary(torch.arange(16.0).reshape(8, 2), 2)[4:], permute_rotary(torch.arange(8.0, 16.0).reshape(4, 2), 1))


def test_export_refuses_bad_outputs_and_unfinished_runs(finished_run, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export_model(finished_run, tmp_path / "other")
    with pytest.raises(ConfigError, match="not a fedtune export"):
        export_model(finished_run, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="--format gguf writes"):
        export_model(finished_run, tmp_path / "x", format="gguf", dtype="q4_k")
    with pytest.raises(ConfigError, match="--format hf writes"):
        export_model(finished_run, tmp_path / "x", dtype="q8_0")
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="cannot write to"):
        export_model(finished_run, tmp_path / "file" / "out")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="has not finished"):
        export_model(unfinished, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_export_overwrites_an_earlier_export(finished_run, tmp_path):
    first = export_model(finished_run, tmp_path / "out", format="gguf", dtype="float16")
    second = export_model(finished_run, tmp_path / "out", format="hf", overwrite=True)
    assert second.folder == first.folder and not list(second.folder.glob("*.gguf"))
    assert (second.folder / "model.safetensors").is_file()


def test_llama_cpp_loads_the_gguf_with_the_same_greedy_tokens(lively_run, hf_export, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = hf_export
    result = export_model(lively_run, tmp_path / "gguf", format="gguf", dtype="float32")
    llm = llama_cpp.Llama(model_path=str(result.folder / result.files[0]), n_ctx=256, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    expected = greedy_ids(AutoModelForCausalLM.from_pretrained(hf), tokenizer)
    for p, want in zip(PROMPTS, expected):
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        got = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):  # greedy; yields the end-of-turn token too
            got.append(tok)
            if len(got) == len(want) or tok == llm.token_eos():
                break
        assert got == want  # the first N_TOKENS greedy tokens (float32: exact)
