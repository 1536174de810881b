"""Built-in demo preference data, made from the demo instruction tasks (:mod:`fedtune.data.demo`).

For every demo prompt the chosen answer is the demo's correct, polite answer; the rejected one
is, at random (seeded), one of three failures a 135M model learns to disprefer within a few
rounds on a CPU:

* ``wrong``: the answer to another prompt of the same task (well formed, but it does not
  answer this question: another country, other numbers, another word);
* ``rude``: the right answer wrapped in a rude remark;
* ``evasive``: a refusal to help.

Categories are the demo tasks, so shard and Dirichlet splits mean something here too.
"""

from __future__ import annotations

import random
from collections import defaultdict

from fedtune.data.demo import demo_examples
from fedtune.data.preferences import PreferencePair
from fedtune.data.prompts import user_message

RUDE = (
    "Ugh, fine. {answer} Stop wasting my time.",
    "{answer} Honestly, even a child knows that.",
    "Figure it out yourself next time. {answer}",
    "Seriously? {answer} Don't bother me again.",
    "{answer} Was that so hard to work out on your own?",
    "Whatever. {answer} Now leave me alone.",
)
EVASIVE = (
    "I don't feel like answering that.",
    "Look it up yourself.",
    "That is not my problem.",
    "Why would I tell you? Ask someone else.",
    "I have better things to do than answer this.",
    "No. Go away.",
)
KINDS = ("wrong", "rude", "evasive")


def demo_preferences(per_category: int = 300, seed: int = 0) -> list[PreferencePair]:
    """Preference pairs over the demo prompts (one per demo example, same order and categories)."""
    examples = demo_examples(per_category, seed)
    rng = random.Random(seed + 1)
    answers: dict[str, list[str]] = defaultdict(list)
    for e in examples:
        answers[e.category].append(e.output)
    pairs = []
    for e in examples:
        kind = rng.choice(KINDS)
        others = [a for a in answers[e.category] if a != e.output]
        if kind == "wrong" and others:
            rejected = rng.choice(others)
        elif kind == "evasive":
            rejected = rng.choice(EVASIVE)
        else:
            rejected = rng.choice(RUDE).format(answer=e.output)
        pairs.append(PreferencePair((("user", user_message(e.instruction, e.input)),), e.output, rejected, e.category))
    return pairs
