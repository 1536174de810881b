"""Which examples go together in a micro-batch. Pure functions of lengths and a Generator.

Length-aware batching: shuffle, cut into mega-batches of ``batch_size * group`` examples,
sort each mega-batch by length and cut it into batches, then shuffle the batch order. Batches
hold similar lengths (little padding) while the order stays random, as in fairseq/HF's
``group_by_length``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def make_batches(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator, by_length: bool = True, group: int = 50
) -> list[list[int]]:
    """One epoch of batches of positions into ``lengths``; every position appears once."""
    order = rng.permutation(len(lengths)).tolist()
    if not by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    mega = batch_size * group
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def plan_steps(
    lengths: Sequence[int],
    batch_size: int,
    grad_accum: int,
    rng: np.random.Generator,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    by_length: bool = True,
) -> list[list[list[int]]]:
    """The optimizer steps of one local training run: a list of steps, each a list of
    ``grad_accum`` (or fewer, at the end of the data) micro-batches.

    With ``max_steps`` the data is cycled (a new shuffle each pass) until exactly
    ``max_steps`` steps are planned; otherwise ``epochs`` full passes are made.
    """
    if not lengths:
        return []
    micro: list[list[int]] = []
    passes = 0
    while True:
        micro.extend(make_batches(lengths, batch_size, rng, by_length))
        passes += 1
        if max_steps is None and passes >= epochs:
            break
        if max_steps is not None and len(micro) >= max_steps * grad_accum:
            micro = micro[: max_steps * grad_accum]
            break
    return [micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)]


def split_steps(
    steps: list[list[list[int]]], sizes: Sequence[int], max_tokens: int | None, packed: bool = False
) -> list[list[list[int]]]:
    """Every micro-batch of every step cut by :func:`split_by_tokens` (None: unchanged)."""
    if max_tokens is None:
        return steps
    return [[piece for batch in step for piece in split_by_tokens(batch, sizes, max_tokens, packed)] for step in steps]


def split_by_tokens(batch: Sequence[int], sizes: Sequence[int], max_tokens: int, packed: bool = False) -> list[list[int]]:
    """Cut one micro-batch into pieces whose size is at most ``max_tokens`` (a larger item
    goes alone): largest first, each piece filled greedily. A piece's size is items x its
    largest ``sizes`` (padded), or the sum of its ``sizes`` (``packed`` into one row).
    ``sizes`` is an example's token count, or what one item costs per row of padding (a
    preference pair: twice its longer sequence).

    The optimizer step still sees the same examples and, since the loss is normalised over the
    whole step, the same gradient; only activation memory (which grows with the padded size)
    and padding shrink."""
    pieces: list[list[int]] = []
    for i in sorted(batch, key=lambda i: -sizes[i]):
        if pieces and _size(pieces[-1] + [i], sizes, packed) <= max_tokens:
            pieces[-1].append(i)
        else:
            pieces.append([i])
    return pieces


def _size(piece: list[int], sizes: Sequence[int], packed: bool) -> int:
    return sum(sizes[i] for i in piece) if packed else len(piece) * max(sizes[i] for i in piece)
