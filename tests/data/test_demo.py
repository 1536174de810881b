from collections import Counter

from fedtune.data.demo import CATEGORIES, demo_examples


def test_deterministic_and_sized():
    a, b = demo_examples(300), demo_examples(300)
    assert a == b
    assert len(a) == 3000
    assert Counter(e.category for e in a) == {c: 300 for c in CATEGORIES}


def test_prompts_are_unique_so_holdout_never_repeats_training():
    ex = demo_examples(300)
    assert len({(e.instruction, e.input) for e in ex}) == len(ex)


def test_answers_are_correct_where_checkable():
    for e in demo_examples(100):
        if e.category == "uppercase":
            assert e.output == e.input.upper()
        if e.category == "sorting":
            nums = [int(x) for x in e.input.split(", ")]
            want = sorted(nums, reverse="largest to smallest" in e.instruction)
            assert e.output == ", ".join(map(str, want))
        if e.category == "arithmetic":
            a, op, b = e.instruction.removeprefix("What is ").rstrip("?").split(" ")
            value = int(a) + int(b) if op == "plus" else int(a) - int(b)
            assert e.output.endswith(f"equals {value}.")
