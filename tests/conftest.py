"""Shared fixtures: offline settings, a tiny random-weight Llama with the real SmolLM2
tokenizer, and a small run config around it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from fedtune.config import load_config  # noqa: E402

# No wall-clock assertions: hypothesis's default 200 ms deadline per example failed
# tests/data/test_preferences.py's tokenizer property on a loaded 2-core machine.
settings.register_profile("fedtune", deadline=None)
settings.load_profile("fedtune")


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The bundled model's folder (converted from GGUF once per machine); its tokenizer is real."""
    from fedtune.model.base import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from fedtune.model.base import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


def build_tiny_llama(path: Path, tokenizer, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, 64-wide Llama with random weights and the SmolLM2 tokenizer, saved to disk."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def tiny_overrides(tiny_model_dir, tmp_path) -> list[str]:
    """Overrides that make any recipe a seconds-long run on the tiny model."""
    return [
        f"model.name={tiny_model_dir}",
        "data.demo_per_category=30",
        "data.max_length=64",
        "partition.method=shards",
        "partition.num_clients=4",
        "partition.holdout_per_category=3",
        "federation.rounds=3",
        "federation.clients_per_round=2",
        "train.local_steps=3",
        "train.batch_size=4",
        "train.lr=0.002",
        "eval.num_samples=1",
        "eval.max_new_tokens=4",
        "output.report=false",  # plots cost seconds per run; tests of the report turn it on
        # fp32 on every CPU: precision=auto picks bf16 autocast on AVX512-BF16/AMX CPUs, where the tests'
        # comparisons across engines and summation orders see bf16 rounding flips that Adam amplifies
        # (Flower vs in-process adapters 0.2% apart in bf16, 1e-5 in fp32, measured on a Xeon with AMX);
        # bf16 has its own tests (test_inprocess.py::test_bf16_autocast_run)
        "train.precision=fp32",
        f"eval.base_cache_dir={tmp_path / 'eval-cache'}",  # a fresh base-evaluation cache per test (not ~/.cache)
        f"output.dir={tmp_path / 'run'}",
    ]


@pytest.fixture
def tiny_config(tiny_overrides):
    return load_config(None, tiny_overrides)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished one-round run of the tiny model (treat as read-only; copy it to change it)."""
    from fedtune.federation.inprocess import run

    out = tmp_path_factory.mktemp("finished") / "run"
    overrides = [
        f"model.name={tiny_model_dir}", "data.demo_per_category=20", "data.max_length=64", "partition.method=shards",
        "partition.num_clients=3", "partition.holdout_per_category=2", "federation.rounds=1", "train.local_steps=2",
        "train.precision=fp32",
        "train.lr=0.002", "eval.num_samples=1", "eval.max_new_tokens=4", "eval.generation_examples=4", "eval.base_cache=false", f"output.dir={out}",
    ]
    run(load_config(None, overrides))
    return out


def pytest_collection_modifyitems(config, items):
    """Mark ``numerics`` every test that compares float results with tests/tolerance.py: `make
    test` reruns them under other CPU kernels (scripts/numerics_other_isa.py), so a tolerance
    that holds only for this CPU's summation order fails here, not on a user's machine."""
    for item in items:
        fn = getattr(item, "function", None)
        names = set(fn.__code__.co_names) if fn is not None else set()
        if any(getattr(getattr(item.module, n, None), "__module__", None) == "tests.tolerance" for n in names):
            item.add_marker(pytest.mark.numerics)
