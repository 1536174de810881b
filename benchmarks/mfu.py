"""Model FLOPs of a fedtune training step, and the machine's GEMM rate at the model's shapes.

MFU (model-FLOP utilisation) = model FLOPs of the work done / seconds / the GEMM rate
measured here with ``torch.matmul`` on the same machine, in the same precision.

What is counted, per micro-batch of packed examples of lengths t_1..t_k (T = sum t_i tokens,
n of them labelled), with N = the frozen base model's linear-layer parameters (every
q/k/v/o/gate/up/down projection; not the embedding, not the head):

- frozen base, forward: ``2 N T``; backward: the input gradient only, another ``2 N T``
  (the base weights are frozen: no weight gradients are formed, so none are counted);
- attention, per layer and example (causal: the t(t+1)/2 query-key pairs a causal kernel
  needs): scores ``QK^T`` and ``PV`` forward ``2 * 2 h d_h t(t+1)/2``; backward four matmuls
  of the same size (dP, dV, dQ, dK), i.e. twice the forward;
- LoRA, per adapted linear (in i, out o, rank r): forward ``2 T r (i + o)`` (x A^T, then
  h B^T); backward the two weight gradients and the two input gradients, twice the forward;
- the LM head on the n labelled positions only (fedtune's head skips the others, model/
  forward.py): logits ``2 n d V``, and their input gradient ``2 n d V`` (frozen head: no
  weight gradient);
- not counted: embedding look-ups, norms, rotary embeddings, activations, softmax and
  the optimizer (element-wise work, not matmuls).

The GEMM rate is the best of a few timed ``torch.matmul`` calls at the model's own shapes
(T x d by d x d, d x kv, d x f, f x d, and the head's ``CHUNK``-row chunks by d x V, model/forward.py), combined as
the shapes occur in one step: total FLOPs over total time.

    python -m benchmarks.mfu          # GEMM rates of the bundled model's shapes (fp32, bf16; on the GPU where there is one)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the FLOP count needs."""

    layers: int
    hidden: int  # d
    heads: int  # h
    head_dim: int  # d_h
    vocab: int  # V
    base_linears: tuple[tuple[int, int], ...]  # (in, out) of every frozen projection, all layers
    lora_linears: tuple[tuple[int, int], ...]  # (in, out) of every LoRA-adapted projection
    rank: int  # LoRA r


def step_flops(shape: ModelShape, lengths: Sequence[int], labelled: int) -> dict[str, int]:
    """Model FLOPs of forward + backward over one micro-batch of examples of ``lengths`` with
    ``labelled`` labelled positions, by term (see the module docstring), and their ``total``."""
    tokens = sum(lengths)
    n_base = sum(i * o for i, o in shape.base_linears)
    pairs = sum(t * (t + 1) // 2 for t in lengths)  # causal query-key pairs
    attention_forward = shape.layers * 2 * 2 * shape.heads * shape.head_dim * pairs
    lora_forward = sum(2 * tokens * shape.rank * (i + o) for i, o in shape.lora_linears)
    terms = {
        "base_forward": 2 * n_base * tokens,
        "base_input_grad": 2 * n_base * tokens,
        "attention": 3 * attention_forward,
        "lora": 3 * lora_forward,
        "head": 2 * 2 * labelled * shape.hidden * shape.vocab,
    }
    terms["total"] = sum(terms.values())
    return terms


def shape_of(model) -> ModelShape:
    """The :class:`ModelShape` of a PEFT-wrapped transformers causal LM."""
    import torch
    from peft.tuners.lora.layer import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    head = base.get_output_embeddings()
    lora, plain = [], []
    adapters = {id(m) for layer in base.modules() if isinstance(layer, LoraLayer) for m in (*layer.lora_A.values(), *layer.lora_B.values())}
    for module in base.modules():
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            lora.append((layer.in_features, layer.out_features))  # its base nn.Linear is counted below
        elif isinstance(module, torch.nn.Linear) and module is not head and id(module) not in adapters:
            plain.append((module.in_features, module.out_features))
    ranks = {a.weight.shape[0] for m in base.modules() if isinstance(m, LoraLayer) for a in m.lora_A.values()}
    heads = config.num_attention_heads
    return ModelShape(
        layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=head.weight.shape[0],
        base_linears=tuple(plain), lora_linears=tuple(lora), rank=max(ranks) if ranks else 0,
    )


def gemm_shapes(shape: ModelShape, tokens: int, labelled: int) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count): the distinct matmuls of a micro-batch's base and head, and how many."""
    counts: dict[tuple[int, int], int] = {}
    for io in shape.base_linears:
        counts[io] = counts.get(io, 0) + 1
    out = [(tokens, i, o, c) for (i, o), c in counts.items()]
    from fedtune.model.forward import CHUNK  # labelled positions per head matmul

    chunks = max(1, round(labelled / CHUNK))
    out.append((CHUNK, shape.hidden, shape.vocab, chunks))
    return out


def gemm_rate(shapes: list[tuple[int, int, int, int]], dtype, repeats: int = 5, device: str = "cpu") -> dict:
    """FLOP/s of ``torch.matmul`` at ``shapes`` in ``dtype`` on ``device``: the best of ``repeats``
    timings of each shape, combined as total FLOPs / total time with each shape's count (on CUDA
    each timing covers ten calls, synchronised before and after)."""
    import torch

    calls = 10 if device.startswith("cuda") else 1
    flops = seconds = 0.0
    per_shape = {}
    for m, k, n, count in shapes:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        torch.matmul(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            synchronize(device)
            t = time.perf_counter()
            for _ in range(calls):
                torch.matmul(a, b)
            synchronize(device)
            best = min(best, (time.perf_counter() - t) / calls)
        per_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / best
        flops += count * 2 * m * k * n
        seconds += count * best
    return {"flops_per_s": flops / seconds, "per_shape_flops_per_s": per_shape}


def synchronize(device: str) -> None:
    """Wait for ``device``'s queued kernels (CUDA runs them asynchronously; a no-op on CPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def machine_rates(shape: ModelShape, tokens: int = 1024, labelled: int = 768, device: str = "cpu") -> dict:
    """fp32 and bf16 GEMM rates at the model's shapes for a micro-batch of ``tokens`` on ``device``."""
    import torch

    shapes = gemm_shapes(shape, tokens, labelled)
    return {name: gemm_rate(shapes, dtype, device=device) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def main() -> None:
    from benchmarks.common import RESULTS, machine, write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--out")
    args = p.parse_args()
    from fedtune.config import load_config
    from fedtune.federation import setup

    bundle = setup.build_model(load_config(None, ["model.name=smollm2-135m-instruct"]))
    shape = shape_of(bundle.model)
    example = step_flops(shape, [args.tokens // 4] * 4, labelled=args.tokens * 3 // 4)
    result = {"machine": machine(), "benchmark": "gemm_rate", "model": "smollm2-135m-instruct", "tokens": args.tokens,
              "note": "best of 5 timings per shape; taken on 2 cores shared with other processes",
              "step_flops_4x256_tokens_768_labelled": example, "rates": machine_rates(shape, args.tokens, device=str(bundle.device))}
    write_json(args.out or RESULTS / "gemm_rate.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
