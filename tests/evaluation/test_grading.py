import pytest

from fedtune.evaluation.grading import (
    Question,
    combine_swapped,
    grade,
    pair_messages,
    parse_rating,
    parse_verdict,
    relative_score,
    single_messages,
    win_tie_loss,
)


@pytest.mark.parametrize(
    "reply, rating",
    [
        ("The answer is correct and concise. Rating: [[7]]", 7.0),
        ("[[ 8.5 ]]", 8.5),
        ("Good. [[7]] To repeat: [[7]]", 7.0),
        ("Mostly right. Rating: 6/10", 6.0),  # no [[...]]: the loose form is accepted
        ("rating: 9", 9.0),
        ("[[10]]", 10.0),
        ("[[1]]", 1.0),
        ("Rating: [[7/10]]", 7.0),  # chat models add the scale inside the brackets
        ("**Rating:** 8", 8.0),  # markdown bold
        ("The rating is **6**/10.", 6.0),
    ],
)
def test_parse_rating_well_formed(reply, rating):
    assert parse_rating(reply) == rating


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "Great answer!",
        "[[rating]]",  # the placeholder, copied
        "[[11]]",  # out of range
        "[[0]]",
        "Either [[3]] or [[8]]",  # contradictory
        "Rating: [[-4]]",
        "Scores: 7 and 8",
        "[[7/5]]",  # not the 1-10 scale
        "**Rating:** [[12]]",
    ],
)
def test_parse_rating_malformed_is_none(reply):
    assert parse_rating(reply) is None


@pytest.mark.parametrize(
    "reply, verdict",
    [("[[A]]", "A"), ("B explains it better. [[B]]", "B"), ("Both equal: [[C]]", "tie"), ("[[ A ]] ... [[A]]", "A")],
)
def test_parse_verdict_well_formed(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize("reply", ["", "A is better", "[[A]] no wait [[B]]", "[[D]]", "[A]"])
def test_parse_verdict_malformed_is_none(reply):
    assert parse_verdict(reply) is None


@pytest.mark.parametrize(
    "first, second, outcome",
    [
        ("A", "B", "win"),  # the candidate is preferred in both positions
        ("B", "A", "loss"),
        ("A", "A", "tie"),  # position bias: each order prefers the first answer
        ("tie", "B", "tie"),
        ("tie", "tie", "tie"),
        (None, "B", None),
        ("A", None, None),
    ],
)
def test_combine_swapped(first, second, outcome):
    assert combine_swapped(first, second) == outcome


def test_relative_score_by_hand():
    # Arrange: only questions 0 and 3 have both ratings: (8 + 4) / (10 + 5)
    candidate = [8.0, None, 6.0, 4.0]
    reference = [10.0, 9.0, None, 5.0]

    # Act
    score = relative_score(candidate, reference)

    # Assert
    assert score["relative"] == pytest.approx(12 / 15)
    assert score["candidate_total"] == 12 and score["reference_total"] == 15 and score["pairs"] == 2
    assert score["mean"] == pytest.approx((8 + 6 + 4) / 3)
    assert score["unparsed"] == 1


def test_relative_score_without_reference_ratings_is_none():
    assert relative_score([5.0], [None])["relative"] is None


def test_win_tie_loss_by_hand():
    counts = win_tie_loss(["win", "win", "tie", "loss", None])
    assert counts == {"win": 2, "tie": 1, "loss": 1, "unparsed": 1, "win_rate": pytest.approx((2 + 0.5) / 4)}
    assert win_tie_loss([None])["win_rate"] is None


def test_prompts_carry_the_rubric_format_and_the_texts():
    single = single_messages("What is 2 plus 2?", "4")
    assert single[0]["role"] == "system" and '"[[rating]]"' in single[1]["content"] and "What is 2 plus 2?" in single[1]["content"]
    pair = pair_messages("Q?", "first", "second")[1]["content"]
    assert pair.index("first") < pair.index("second") and '"[[C]]" for a tie' in pair


def test_grade_combines_single_and_swapped_pairwise():
    # Arrange: a scripted judge that rates the reference 10, "good" 8, "bad" 2 (and "odd" unparseable),
    # and in pairwise prefers whichever answer is the reference.
    questions = [Question("q1", "ref1"), Question("q2", "ref2")]

    def judge(messages):
        text = messages[1]["content"]
        if "[User Question]" in text:
            a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n")[0]
            return "[[A]]" if a.startswith("ref") else "[[B]]"
        answer = text.split("[The Start of Assistant's Answer]\n")[1].split("\n")[0]
        return {"good": "[[8]]", "bad": "[[2]]", "odd": "no idea"}.get(answer, "Rating: [[10]]")

    # Act
    out = grade(judge, questions, {"m": ["good", "bad"], "n": ["odd", "good"]})

    # Assert
    assert out["reference_ratings"] == [10.0, 10.0]
    m = out["models"]["m"]
    assert m["single"]["ratings"] == [8.0, 2.0] and m["single"]["relative"] == pytest.approx(10 / 20)
    assert m["pairwise"]["loss"] == 2 and m["pairwise"]["outcomes"] == ["loss", "loss"]
    n = out["models"]["n"]
    assert n["single"]["unparsed"] == 1 and n["single"]["relative"] == pytest.approx(8 / 10)
