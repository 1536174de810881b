"""Compression of client updates (the client -> server upload).

A delta is encoded into a flat payload of small tensors, sent, and decoded on the server:

- ``int8``: block-wise symmetric quantisation, ``q = round(x / s)`` with ``s = max|x| / 127``
  per block of ``block`` values. ~3.9x fewer bytes than float32 (block 64).
- ``int4``: the same with 4-bit codes in [-7, 7], two per byte. ~7.5x fewer bytes.
- ``topk``: keep the ``fraction`` largest-magnitude entries of each tensor (bf16 values,
  int32 flat indices). 1 / (fraction * 1.5) fewer bytes.

Scales and top-k values travel as bfloat16 (2 bytes, float32's exponent range), carried as
their int16 bit patterns because the wire (numpy arrays in Flower records) has no bfloat16.
fp16, used before, has a range of 6e-8..65504: a block whose largest entry was below ~3.8e-6
(int8) got a zero scale and decoded to zeros (entries of std 1e-6 lost 95% of the update),
and one above ~8.3e6 got an infinite scale, decoded to NaN and, with error feedback, poisoned
the client's residual for good. A scale is rounded *up* to bfloat16, so ``|x| / s`` never
exceeds the code range; the price is a step up to 2^-7 (0.8%) coarser than ``max|x| / levels``,
so a block's largest entry may decode up to 0.8% larger than it was. Below float32's smallest
normal number (2^-126, ~1.2e-38) bfloat16 keeps only a few bits (a subnormal 1.5e-40 is sent
as 1.8e-40), so a block whose scale would be that small (every entry below ``levels`` x 2^-126,
~1.5e-36 for int8) and a top-k value that small are sent as zero; error feedback keeps them in
the residual. Such entries are nothing next to any float32 weight they are added to.

With error feedback (Seide et al. 2014; Karimireddy et al., "Error Feedback Fixes SignSGD",
ICML 2019) a client adds what earlier rounds' compression dropped (its residual) to the new
delta before encoding, and keeps the new residual, so the error does not accumulate.

Pure functions; the payload's keys are ``<adapter key>::<part>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from fedtune.types import Adapter

METHODS = ("none", "int8", "int4", "topk")
SEP = "::"
TINY = torch.finfo(torch.float32).tiny  # 2^-126: below it bfloat16 (like float32) is subnormal, a few bits


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)  # (n_blocks, block)


def bf16_up(x: torch.Tensor) -> torch.Tensor:
    """Non-negative finite float32 ``x`` rounded up to the nearest bfloat16 (returned as
    float32, exactly representable in bfloat16): clear the low 16 bits after adding 0xFFFF."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def to_wire(x: torch.Tensor) -> torch.Tensor:
    """float32 values that are exact in bfloat16 (or any, rounded to nearest) -> their bfloat16
    bit patterns as int16, 2 bytes each."""
    return x.to(torch.bfloat16).view(torch.int16)


def from_wire(bits: torch.Tensor) -> torch.Tensor:
    """int16 bfloat16 bit patterns (:func:`to_wire`) -> float32."""
    return bits.view(torch.bfloat16).float()


def _quantize(x: torch.Tensor, block: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocks(x.float(), block)  # (n, block)
    raw = blocks.abs().amax(dim=1, keepdim=True) / levels  # (n, 1)
    scale = torch.where(raw >= TINY, bf16_up(raw), torch.zeros_like(raw))  # exactly what the server will see; 0: all zeros
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # |x| < levels * TINY there: every code rounds to 0
    codes = torch.clamp(torch.round(blocks / safe), -levels, levels).to(torch.int8)  # (n, block)
    return codes, to_wire(scale.squeeze(1))


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    values = codes.float() * from_wire(scale).unsqueeze(1)  # (n, block)
    return values.reshape(-1)[: math.prod(shape)].reshape(shape)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] -> uint8, two per byte (low nibble first)."""
    u = (codes.reshape(-1) + 8).to(torch.uint8)  # [1, 15]
    if u.numel() % 2:
        u = torch.cat([u, torch.full((1,), 8, dtype=torch.uint8)])
    return u[0::2] | (u[1::2] << 4)


def _unpack4(packed: torch.Tensor, n: int) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:n].to(torch.int8) - 8


def compress(delta: Adapter, method: str, *, block: int = 64, fraction: float = 0.1) -> dict[str, torch.Tensor]:
    """Encode ``delta`` into the payload a client uploads."""
    if method == "none":
        return {k: v for k, v in delta.items()}
    out: dict[str, torch.Tensor] = {}
    for k, x in delta.items():
        if method in ("int8", "int4"):
            codes, scale = _quantize(x, block, 127 if method == "int8" else 7)
            out[f"{k}{SEP}q"] = codes.reshape(-1) if method == "int8" else _pack4(codes)
            out[f"{k}{SEP}s"] = scale
        elif method == "topk":
            flat = x.reshape(-1).float()
            k_keep = max(1, int(math.ceil(fraction * flat.numel())))
            idx = torch.topk(flat.abs(), k_keep, sorted=False).indices
            idx = torch.sort(idx).values  # deterministic order on the wire
            out[f"{k}{SEP}i"] = idx.to(torch.int32)
            kept = flat[idx]
            out[f"{k}{SEP}v"] = to_wire(torch.where(kept.abs() >= TINY, kept, torch.zeros_like(kept)))  # no subnormal
        else:
            raise ValueError(f"unknown compression method {method!r}")  # config validation prevents this
    return out


def decompress(payload: dict[str, torch.Tensor], like: Adapter, method: str, *, block: int = 64) -> Adapter:
    """Decode a payload back into a float32 delta shaped like ``like`` (the global adapter)."""
    if method == "none":
        return {k: payload[k].float() for k in like}
    out: Adapter = {}
    for k, ref in like.items():
        n = ref.numel()
        if method in ("int8", "int4"):
            q = payload[f"{k}{SEP}q"]
            n_pad = n + (-n) % block
            codes = q if method == "int8" else _unpack4(q, n_pad)
            out[k] = _dequantize(codes.reshape(-1, block), payload[f"{k}{SEP}s"], ref.shape)
        else:
            flat = torch.zeros(n, dtype=torch.float32)
            flat[payload[f"{k}{SEP}i"].long()] = from_wire(payload[f"{k}{SEP}v"])
            out[k] = flat.reshape(ref.shape)
    return out


def payload_bytes(payload: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data in a payload (what the wire carries besides names and shapes)."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def compress_with_feedback(
    delta: Adapter, residual: Optional[Adapter], method: str, *, block: int = 64, fraction: float = 0.1
) -> tuple[dict[str, torch.Tensor], Adapter]:
    """Error feedback: encode ``delta + residual``; return (payload, new residual)."""
    target = {k: v + residual[k] for k, v in delta.items()} if residual else dict(delta)
    payload = compress(target, method, block=block, fraction=fraction)
    sent = decompress(payload, target, method, block=block)
    return payload, {k: target[k] - sent[k] for k in target}


@dataclass(frozen=True)
class Compression:
    """How a client encodes its upload (``compression.*`` in the config)."""

    method: str = "none"
    block: int = 64
    fraction: float = 0.1
    error_feedback: bool = True

    def encode(self, delta: Adapter, residual: Optional[Adapter]) -> tuple[dict[str, torch.Tensor], Optional[Adapter]]:
        """(payload, the client's new residual; None without error feedback)."""
        if self.method == "none":
            return compress(delta, "none"), None
        if self.error_feedback:
            return compress_with_feedback(delta, residual, self.method, block=self.block, fraction=self.fraction)
        return compress(delta, self.method, block=self.block, fraction=self.fraction), None

    def decode(self, payload: dict[str, torch.Tensor], like: Adapter) -> Adapter:
        """The delta the server aggregates (float32, shaped like the global adapter)."""
        return decompress(payload, like, self.method, block=self.block)


def dense_bytes(adapter: Adapter) -> int:
    """Bytes of ``adapter`` sent uncompressed as float32 (the baseline upload)."""
    return sum(t.numel() * 4 for t in adapter.values())


def encode_upload(update, compression: Compression, residual: Optional[Adapter]) -> tuple[dict[str, torch.Tensor], Optional[Adapter]]:
    """The client side of an upload (in-process and on a Flower node alike): the payload that
    replaces ``update.delta`` on the wire and the client's new error-feedback residual. Records
    ``upload_bytes`` (payload + SCAFFOLD's uncompressed control delta) and
    ``upload_bytes_fp32`` (the same sent as float32) in ``update.metrics``."""
    payload, new_residual = compression.encode(update.delta, residual)
    control = dense_bytes(update.control_delta) if update.control_delta is not None else 0
    update.metrics["upload_bytes"] = payload_bytes(payload) + control
    update.metrics["upload_bytes_fp32"] = dense_bytes(update.delta) + control
    return payload, new_residual
