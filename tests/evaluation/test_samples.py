from fedtune.data.preferences import PreferencePair
from fedtune.data.sources import Example
from fedtune.evaluation.samples import loss_changes, pick_samples, samples_headline


def ex(cat, n):
    return Example(f"{cat} question {n}", "", f"{cat} answer {n}", cat)


ROWS = [ex("a", 0), ex("b", 0), ex("a", 1), ex("c", 0), ex("b", 1), ex("c", 1), ex("a", 2)]


def test_loss_changes_per_category():
    before = {"loss": 2.0, "per_category": {"a": {"loss": 2.0}, "b": {"loss": 1.0}, "c": {"loss": 3.0}}}
    after = {"loss": 1.5, "per_category": {"a": {"loss": 1.5}, "b": {"loss": 1.25}}}
    assert loss_changes(before, after) == {"a": -0.5, "b": 0.25}
    assert loss_changes(None, after) == {} and loss_changes(before, None) == {}


def test_held_out_rows_of_the_most_improved_categories_first_round_robin():
    # Arrange: rows 5 and 6 are training rows (not held out); c fell most, then a, then b (which rose)
    holdout = [0, 1, 2, 3, 4]
    changes = {"a": -0.5, "b": 0.25, "c": -0.9}

    # Act
    picked = pick_samples(ROWS, holdout, 4, changes)

    # Assert: one row of c, a, b (in held-out order within a category), then a second a (c has only one held out)
    assert [(s["prompt"], s["loss_change"]) for s in picked] == [
        ("c question 0", -0.9), ("a question 0", -0.5), ("b question 0", 0.25), ("a question 1", -0.5)]
    assert picked[0] == {"prompt": "c question 0", "input": "", "reference": "c answer 0", "category": "c", "loss_change": -0.9}
    assert pick_samples(ROWS, holdout, 4, changes) == picked  # deterministic
    assert samples_headline(picked) == ("samples from the held-out categories whose held-out loss fell most over the run: "
                                        "c (-0.90 nats), a (-0.50 nats); then from categories where it did not fall: b (+0.25 nats)")


def test_a_category_whose_loss_rose_is_never_said_to_have_fallen():
    """Before: a run where no loss fell printed 'whose held-out loss fell most over the run: b (+0.25 nats)'."""
    rose = pick_samples(ROWS, [0, 1, 2, 3, 4], 2, {"a": 0.5, "b": 0.25, "c": 0.0})
    assert [s["category"] for s in rose] == ["c", "b"]
    assert samples_headline(rose) == ("held-out loss fell in none of the sampled categories over the run; samples from "
                                      "those where it rose least: c (+0.00 nats), b (+0.25 nats)")
    one = pick_samples(ROWS, [0, 1], 1, {"a": -0.25})
    assert samples_headline(one) == "samples from the held-out categories whose held-out loss fell most over the run: a (-0.25 nats)"
    diverged = pick_samples(ROWS, [0, 1, 2, 3, 4], 3, {"a": float("nan"), "b": 0.1, "c": -0.2})
    assert [s["category"] for s in diverged] == ["c", "b", "a"]  # a nan change sorts last


def test_without_changes_categories_in_order_of_appearance_and_ties_by_name():
    assert [s["prompt"] for s in pick_samples(ROWS, [2, 1, 3], 2)] == ["a question 1", "b question 0"]
    assert samples_headline(pick_samples(ROWS, [2, 1, 3], 2)) is None
    tied = pick_samples(ROWS, [0, 1, 3], 2, {"c": -0.1, "b": -0.1, "a": 0.0})
    assert [s["category"] for s in tied] == ["b", "c"]
    assert pick_samples(ROWS, [0, 1], 0, {"a": -1.0}) == []


def test_multi_turn_preference_pairs_are_not_samples():
    pairs = [PreferencePair((("user", "hi"), ("assistant", "yo"), ("user", "more")), "x", "y", "m"),
             PreferencePair((("user", "Say hi"),), "hi", "no", "s")]
    assert pick_samples(pairs, [0, 1], 2, {"m": -1.0, "s": -0.1}) == [
        {"prompt": "Say hi", "input": "", "reference": "hi", "category": "s", "loss_change": -0.1}]
