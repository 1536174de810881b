import json

from fedtune.data.categories import OTHER, first_word, first_word_categories
from fedtune.data.sources import Example, load_examples

ALPACA = {"instruction": "instruction", "input": "input", "output": "output", "category": "category"}


def ex(instruction: str) -> Example:
    return Example(instruction=instruction, input="", output="x", category="all")


def test_first_word_is_lower_cased_without_punctuation():
    assert first_word("Generate a poem.") == "generate"
    assert first_word("  \"Rewrite, please: this\"") == "rewrite"
    assert first_word("What's 2+2?") == "what's"
    assert first_word("?!") == ""


def test_the_most_frequent_first_words_are_kept_and_the_rest_are_other():
    rows = [ex("Write a poem"), ex("write code"), ex("Explain X"), ex("Explain Y"), ex("Name a cat"), ex("List 3"), ex("...")]
    cats = [e.category for e in first_word_categories(rows, 2)]
    assert cats == ["write", "write", "explain", "explain", OTHER, OTHER, OTHER]
    # ties between equally frequent words go by the word, so the result does not depend on row order
    assert [e.category for e in first_word_categories(rows[4:6], 1)] == [OTHER, "list"]  # name, list
    assert [e.category for e in first_word_categories(rows[4:6][::-1], 1)] == ["list", OTHER]


def test_only_the_category_changes():
    (e,) = first_word_categories([Example("Add 1 and 2", "now", "3", "math")], 5)
    assert e == Example("Add 1 and 2", "now", "3", "add")


def test_load_examples_derives_categories_when_asked(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"instruction": i, "input": "", "output": "o"}) + "\n"
                         for i in ["Give a name", "give two", "Sort these"]))
    plain, _ = load_examples(str(f), ALPACA)
    derived, _ = load_examples(str(f), ALPACA, instruction_categories=1)
    assert [e.category for e in plain] == ["all"] * 3
    assert [e.category for e in derived] == ["give", "give", OTHER]
