import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedtune.evaluation.generation import (
    exact_match,
    lcs_length,
    normalize_answer,
    pick_generation_subset,
    rouge_l,
    rouge_tokens,
    score_answers,
)


def test_tokens_are_lowercased_alphanumeric_runs():
    assert rouge_tokens("A cow says 'moo'!  It's 2x-faster.") == ["a", "cow", "says", "moo", "it", "s", "2x", "faster"]


@pytest.mark.parametrize(
    "candidate, reference, p, r",
    [
        # LCS "the cat on the mat" = 5 of 6 tokens each way
        ("the cat sat on the mat", "the cat lay on the mat", 5 / 6, 5 / 6),
        # LCS "a cow says moo" = 4: P = 4/4, R = 4/5
        ("A cow says 'moo'.", "A cow says moo loudly", 1.0, 4 / 5),
        # order matters: LCS of [b a c] and [a b c] is 2 ("a c" or "b c")
        ("b a c", "a b c", 2 / 3, 2 / 3),
        ("Paris!", "paris", 1.0, 1.0),
    ],
)
def test_rouge_l_against_hand_computed_values(candidate, reference, p, r):
    # Act
    score = rouge_l(candidate, reference)

    # Assert: F = 2PR / (P + R)
    assert score["precision"] == pytest.approx(p)
    assert score["recall"] == pytest.approx(r)
    assert score["f"] == pytest.approx(2 * p * r / (p + r))


def test_rouge_l_of_disjoint_or_empty_text_is_zero():
    assert rouge_l("", "the answer")["f"] == 0.0
    assert rouge_l("nothing shared", "the answer")["f"] == 0.0
    assert rouge_l("...", "")["f"] == 0.0


def test_second_worked_example_f_is_eight_ninths():
    assert rouge_l("A cow says 'moo'.", "A cow says moo loudly")["f"] == pytest.approx(8 / 9)


@given(st.lists(st.sampled_from("abcd"), max_size=12), st.lists(st.sampled_from("abcd"), max_size=12))
def test_lcs_is_symmetric_and_bounded(a, b):
    n = lcs_length(a, b)
    assert n == lcs_length(b, a)
    assert 0 <= n <= min(len(a), len(b))
    assert lcs_length(a, a) == len(a)


def test_exact_match_after_normalisation():
    assert normalize_answer("The capital of France is Paris.") == "capital of france is paris"
    assert exact_match("the capital of France is  Paris", "The capital of France is Paris.") == 1.0
    assert exact_match("Paris", "Paris, France") == 0.0
    assert exact_match("b a c", "b c") == 1.0  # "a" is an article, dropped before comparing


def test_score_answers_overall_and_per_category():
    # Arrange: ROUGE-L F 1, 0, 2/3 ; EM 1, 0, 0
    answers = ["a b", "x", "y x z"]
    references = ["a b", "y", "x y z"]
    categories = ["k", "k", "m"]

    # Act
    scores = score_answers(answers, references, categories)

    # Assert
    assert scores["rouge_l"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["examples"] == 3
    assert scores["per_category"]["k"] == {"rouge_l": 0.5, "exact_match": 0.5, "examples": 2}
    assert scores["per_category"]["m"]["rouge_l"] == pytest.approx(2 / 3)


def test_score_answers_of_nothing():
    assert score_answers([], [], []) == {"rouge_l": 0.0, "exact_match": 0.0, "examples": 0, "per_category": {}}


def test_generation_subset_covers_categories_round_robin():
    categories = ["a", "a", "a", "b", "b", "c"]
    # depth 0: a->0, b->3, c->5; depth 1: a->1, b->4; depth 2: a->2
    assert pick_generation_subset(categories, 4) == [0, 3, 5, 1]
    assert pick_generation_subset(categories, None) == [0, 3, 5, 1, 4, 2]
    assert pick_generation_subset(categories, 10) == [0, 3, 5, 1, 4, 2]
    assert pick_generation_subset(categories, 0) == []
    assert pick_generation_subset([], None) == []
