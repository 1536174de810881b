import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.data.batching import make_batches, plan_steps, split_by_tokens, split_steps


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=200), bs=st.integers(1, 9), by_length=st.booleans())
def test_each_example_once_per_epoch(lengths, bs, by_length):
    batches = make_batches(lengths, bs, np.random.default_rng(0), by_length)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= bs for b in batches)


def padded(lengths, batches):
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(1).integers(5, 250, size=400).tolist()
    grouped = make_batches(lengths, 4, np.random.default_rng(0), by_length=True)
    shuffled = make_batches(lengths, 4, np.random.default_rng(0), by_length=False)
    assert padded(lengths, grouped) < 0.8 * padded(lengths, shuffled)


def test_plan_steps_epochs_and_max_steps():
    lengths = [10] * 10
    steps = plan_steps(lengths, 2, 2, np.random.default_rng(0), epochs=2)
    assert len(steps) == 5  # 2 epochs x 5 micro-batches, 2 per step
    steps = plan_steps(lengths, 4, 1, np.random.default_rng(0), max_steps=7)  # cycles through the data
    assert len(steps) == 7 and all(len(s) == 1 for s in steps)
    assert plan_steps([], 4, 1, np.random.default_rng(0), max_steps=3) == []


def test_plan_is_reproducible():
    lengths = list(range(1, 50))
    a = plan_steps(lengths, 3, 2, np.random.default_rng(5), epochs=1)
    assert a == plan_steps(lengths, 3, 2, np.random.default_rng(5), epochs=1)


@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    max_tokens=st.integers(1, 1200),
    packed=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_split_by_tokens_keeps_every_example_within_the_budget(lengths, max_tokens, packed):
    batch = list(range(len(lengths)))
    pieces = split_by_tokens(batch, lengths, max_tokens, packed)
    assert sorted(i for p in pieces for i in p) == batch  # same examples, each once

    def size(piece):
        return sum(lengths[i] for i in piece) if packed else len(piece) * max(lengths[i] for i in piece)

    for piece in pieces:
        assert size(piece) <= max_tokens or len(piece) == 1  # only a single too-long example goes over
    assert sum(size(p) for p in pieces) <= size(batch)  # never more tokens in all (padding only shrinks)
    if size(batch) <= max_tokens:
        assert len(pieces) == 1


def test_split_steps_by_hand():
    lengths = [250, 120, 110, 100, 30]
    steps = [[[0, 1, 2, 3], [4]]]
    assert split_steps(steps, lengths, 512) == [[[0, 1], [2, 3], [4]]]  # 2 x 250 and 2 x 110
    assert split_steps(steps, lengths, 1000) == [[[0, 1, 2, 3], [4]]]
    assert split_steps(steps, lengths, 100) == [[[0], [1], [2], [3], [4]]]
    assert split_steps(steps, lengths, None) is steps
    assert split_steps(steps, lengths, 512, packed=True) == [[[0, 1, 2], [3], [4]]]  # 480 tokens, then 100
