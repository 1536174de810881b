import pytest
import torch



def test_quantized_loading_needs_cuda_with_a_one_line_error():
    from fedtune.errors import ModelError
    from fedtune.model.base import quantization_kwargs

    assert quantization_kwargs("none", torch.float32, torch.device("cpu")) == {}
    with pytest.raises(ModelError, match="model.quantize=4bit needs a CUDA device"):
        quantization_kwargs("4bit", torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("bf16_gpu", [True, False])
def test_auto_weights_dtype_follows_the_compute_precision(bf16_gpu, monkeypatch):
    """model.dtype=auto on CUDA: the weights in the compute precision (train.precision=fp32 on a
    GPU got bf16 weights before: a float32 run that was not one); float32 on a CPU."""
    from fedtune.model.base import pick_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pick_dtype("auto", cuda, "bf16") == (torch.bfloat16 if bf16_gpu else torch.float32)
    assert pick_dtype("auto", cuda, "fp16") == torch.float16
    assert pick_dtype("auto", cuda, "fp32") == torch.float32
    assert pick_dtype("auto", cpu, "bf16") == pick_dtype("auto", cpu, "fp32") == torch.float32
    assert pick_dtype("bfloat16", cpu, "fp32") == torch.bfloat16


def test_a_repeated_library_warning_is_logged_once(caplog):
    """bitsandbytes' 8-bit matmul logs the same warning on every call (658 lines in a 6-step run
    of a 2-layer model on an H200); after loading an 8-bit model each message shows once."""
    import logging

    from fedtune.model.base import BNB_MATMUL_LOGGER, log_each_message_once

    log_each_message_once(BNB_MATMUL_LOGGER)
    log_each_message_once(BNB_MATMUL_LOGGER)  # a second 8-bit load adds no second filter
    logger = logging.getLogger(BNB_MATMUL_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_MATMUL_LOGGER):
        for _ in range(3):
            logger.warning("inputs will be cast from %s to float16", "torch.bfloat16")
        logger.warning("another message")
    assert [r.getMessage() for r in caplog.records] == ["inputs will be cast from torch.bfloat16 to float16", "another message"]


def test_models_load_without_hub_kernels(tiny_model_dir):
    """transformers 5.x kernelizes a loaded model with kernels it downloads from the Hub (on CUDA:
    offline, the load failed); fedtune loads every model with use_kernels=False."""
    from fedtune.model.base import load_model

    assert not load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu")).use_kernels


def _truncated_model(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    return weights


@pytest.mark.parametrize("cached", [False, True])
def test_a_truncated_weights_file_is_a_model_error_naming_it(tmp_path, monkeypatch, cached):
    from fedtune.errors import ModelError
    from fedtune.model.base import load_model

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / ("cache/models/SmolLM2-135M-Instruct-1" if cached else "my-model")
    weights = _truncated_model(folder)
    with pytest.raises(ModelError) as e:
        load_model(str(folder), dtype=torch.float32, device=torch.device("cpu"))
    message = str(e.value)
    assert message.startswith(f"{weights} is truncated or corrupt (") and "\n" not in message
    fix = f"delete the cached copy {folder} and run again" if cached else f"copy or download the model into {folder} again"
    assert fix in message
