"""What runs differently on a GPU, checked on one (skipped without CUDA; the H200 run is recorded
in benchmarks/results/cuda-tests.json): keep-masks from CUDA's generator, the lean LoRA dropout
and the fused LM head under CUDA bf16 autocast, bitsandbytes 8-bit/4-bit base weights loaded and
trained, and whole runs in bf16 and in fp32 against the CPU (Flower's simulation sharing one GPU:
tests/federation/flower/test_simulation_cuda.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedtune.config import load_config
from fedtune.federation.inprocess import run
from fedtune.model import forward
from fedtune.model.lora import load_adapter
from fedtune.model.lora_dropout import keep_mask, lora_forward, pack_bits, unpack_bits
from tests.run_records import records
from tests.tolerance import adapters_close, numbers_close

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
FP32 = ["train.precision=fp32", "model.dtype=float32"]  # float32 weights, explicitly (as run on the H200)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_keep_masks_come_from_cudas_generator_at_the_asked_rate():
    torch.cuda.manual_seed(3)
    a = keep_mask(torch.Size([64, 1000]), 0.25, CUDA)
    torch.cuda.manual_seed(3)
    assert a.device.type == "cuda" and torch.equal(a, keep_mask(torch.Size([64, 1000]), 0.25, CUDA))
    n, dropped = a.numel(), int((~a).sum())
    assert abs(dropped - n * 0.25) <= 6 * math.sqrt(n * 0.25 * 0.75)
    packed = pack_bits(a)  # kept for backward one bit per element, on the GPU as on a CPU
    assert packed.device.type == "cuda" and packed.numel() == a.numel() // 8
    assert torch.equal(unpack_bits(packed, a.shape), a.to(torch.uint8)) and torch.equal(packed.cpu(), pack_bits(a.cpu()))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lean_lora_dropout_under_cuda_bf16_autocast_is_the_float64_formula_to_bf16_precision(p):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 64, 576, device=CUDA, generator=g).bfloat16().requires_grad_()
    result = torch.randn(2, 64, 1536, device=CUDA, generator=g).bfloat16().requires_grad_()
    a = (0.2 * torch.randn(8, 576, device=CUDA, generator=g)).requires_grad_()
    b = (0.2 * torch.randn(1536, 8, device=CUDA, generator=g)).requires_grad_()
    upstream = torch.randn(2, 64, 1536, device=CUDA, generator=g)
    torch.cuda.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = lora_forward(result, x, a, b, p, 2.0, training=True)
    grads = torch.autograd.grad((out.float() * upstream).sum(), (result, x, a, b))
    torch.cuda.manual_seed(1)  # the mask the forward drew
    keep = keep_mask(x.shape, p, CUDA).double() / (1 - p) if p else 1.0
    r64, x64, a64, b64 = (t.detach().double().requires_grad_() for t in (result, x, a, b))
    ref = r64 + (x64 * keep) @ a64.T @ b64.T * 2.0
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), (r64, x64, a64, b64))
    assert out.dtype == torch.bfloat16 and grads[2].dtype == torch.float32  # the adapter's gradients stay fp32
    assert rel_l2(out.double() - r64, ref - r64) < 2e-2  # the LoRA term itself, not swamped by result
    assert all(rel_l2(ours, theirs) < 2e-2 for ours, theirs in zip(grads, ref_grads))


def test_fused_head_under_cuda_bf16_autocast_is_cross_entropy_in_float64_to_bf16_precision(monkeypatch):
    monkeypatch.setattr(forward, "CHUNK", 64)
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 576, device=CUDA, generator=g, requires_grad=True)
    weight = 0.05 * torch.randn(49152, 576, device=CUDA, generator=g)
    targets = torch.randint(0, 49152, (300,), device=CUDA, generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        nll = forward.HeadNLL.apply(hidden, weight, targets)
    (grad,) = torch.autograd.grad(nll.sum(), hidden)
    h64 = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ weight.double().T, targets, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), h64)
    assert rel_l2(nll, ref) < 1e-2 and rel_l2(grad, ref_grad) < 3e-2


def test_default_run_on_cuda_trains_in_bf16(tiny_overrides, tmp_path):
    """precision=auto and model.dtype=auto on a GPU (bf16 autocast), with lean LoRA dropout and
    the fused head: finite fp32 adapters come out and the held-out loss falls."""
    result = run(load_config(None, tiny_overrides + ["train.precision=auto", "lora.dropout=0.1"]))
    adapter, _ = load_adapter(result.run_dir / "adapter")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in adapter.values())
    evals = records(result.run_dir, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"]


def test_fp32_run_on_cuda_is_the_cpu_run(tiny_overrides, tmp_path):
    """The same federation on the GPU and on the CPU in float32 (no dropout: the two devices'
    generators draw different masks): same held-out loss before training, adapters equal up to
    the two devices' summation orders amplified by Adam (a wrong mask, dtype or device gives O(1))."""
    common = tiny_overrides + FP32 + ["lora.dropout=0"]
    gpu = run(load_config(None, common + [f"output.dir={tmp_path / 'gpu'}"]))
    cpu = run(load_config(None, common + ["model.device=cpu", f"output.dir={tmp_path / 'cpu'}"]))
    assert numbers_close(records(gpu.run_dir, "eval")[0]["loss"], records(cpu.run_dir, "eval")[0]["loss"], 1e-4)
    a, _ = load_adapter(gpu.run_dir / "adapter")
    b, _ = load_adapter(cpu.run_dir / "adapter")
    assert adapters_close(a, b, rel=2e-2)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_base_weights_load_and_train(bits, tiny_overrides):
    """model.quantize: bitsandbytes LLM.int8 / NF4 base layers, LoRA trained on top in bf16."""
    pytest.importorskip("bitsandbytes")
    from fedtune.federation import setup

    cfg = load_config(None, tiny_overrides + [f"model.quantize={bits}", "train.precision=auto"])
    bundle = setup.build_model(cfg, training=True)
    kinds = {type(m).__name__ for m in bundle.model.modules()}
    assert ("Linear8bitLt" if bits == "8bit" else "Linear4bit") in kinds
    del bundle
    result = run(cfg)
    adapter, _ = load_adapter(result.run_dir / "adapter")
    assert all(torch.isfinite(v).all() for v in adapter.values())
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    evals = records(result.run_dir, "eval")
    assert all(math.isfinite(e["loss"]) for e in evals) and evals[-1]["loss"] < evals[0]["loss"]
