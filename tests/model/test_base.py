import pytest
import torch



def test_quantized_loading_needs_cuda_with_a_one_line_error():
    from fedtune.errors import ModelError
    from fedtune.model.base import quantization_kwargs

    assert quantization_kwargs("none", torch.float32, torch.device("cpu")) == {}
    with pytest.raises(ModelError, match="model.quantize=4bit needs a CUDA device"):
        quantization_kwargs("4bit", torch.float32, torch.device("cpu"))
