from collections import Counter

from fedtune.data.demo import CATEGORIES, demo_examples
from fedtune.data.demo_preferences import EVASIVE, demo_preferences


def test_one_pair_per_demo_example_deterministic():
    a, b = demo_preferences(20), demo_preferences(20)
    examples = demo_examples(20)
    assert a == b and len(a) == len(examples)
    assert [p.chosen for p in a] == [e.output for e in examples]  # chosen: the demo's correct answer
    assert set(p.category for p in a) == set(CATEGORIES)
    assert all(len(p.prompt) == 1 and p.prompt[0][0] == "user" for p in a)


def test_rejected_answers_are_wrong_rude_or_evasive():
    pairs = demo_preferences(30)
    kinds = Counter(
        "evasive" if p.rejected in EVASIVE else "rude" if p.chosen in p.rejected else "wrong" for p in pairs
    )
    assert all(p.rejected != p.chosen for p in pairs)
    assert min(kinds["wrong"], kinds["rude"], kinds["evasive"]) > len(pairs) / 5  # a real mix of the three
