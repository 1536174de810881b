import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedtune.data.preferences import (
    PreferencePair,
    collate_pairs,
    encode_preferences,
    fit_length,
    load_preferences,
    parse_dialogue,
    render_pair,
)
from fedtune.errors import DataError

COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "category": "category"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path, rows, **kw):
    return load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), COLUMNS, **kw)


def test_prompt_chosen_rejected_records(tmp_path):
    (p,), report = load(tmp_path, [{"prompt": "Say hi", "chosen": " Hello! ", "rejected": "No.", "category": "greet"}])
    assert p == PreferencePair((("user", "Say hi"),), "Hello!", "No.", "greet")
    assert report.rows == 1 and report.skipped == 0


def test_anthropic_single_turn_dialogues(tmp_path):
    row = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Five."}
    (p,), _ = load(tmp_path, [row])
    assert p == PreferencePair((("user", "What is 2+2?"),), "4.", "Five.", "all")


def test_anthropic_multi_turn_dialogues_share_the_conversation(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke."
    row = {"chosen": shared + "\n\nAssistant: Why did the chicken cross the road?", "rejected": shared + "\n\nAssistant: No."}
    (p,), _ = load(tmp_path, [row])
    assert p.prompt == (("user", "Hi"), ("assistant", "Hello, how can I help?"), ("user", "Tell me a joke."))
    assert (p.chosen, p.rejected) == ("Why did the chicken cross the road?", "No.")


def test_an_empty_final_answer_is_a_valid_answer(tmp_path):
    row = {"chosen": "\n\nHuman: Swear at me.\n\nAssistant:", "rejected": "\n\nHuman: Swear at me.\n\nAssistant: Ok"}
    (p,), _ = load(tmp_path, [row])
    assert (p.chosen, p.rejected) == ("", "Ok")


def test_an_answer_of_several_assistant_turns_is_kept_whole(tmp_path):
    # as in hh-rlhf: a run-on Human turn inside an answer, then a second Assistant turn
    shared = "\n\nHuman: Are drag queens men?\n\nAssistant: Mostly.\n\nHuman: Isn't that drag kings?"
    row = {"chosen": shared + "\n\nAssistant: No, kings are women.  Human: Why?\n\nAssistant: Because.", "rejected": shared + "\n\nAssistant: Yes."}
    (p,), _ = load(tmp_path, [row])
    assert p.chosen == "No, kings are women.  Human: Why?\n\nAssistant: Because." and p.rejected == "Yes."
    assert p.prompt[-1] == ("user", "Isn't that drag kings?")


def test_prompt_given_as_a_dialogue_with_plain_answers(tmp_path):
    row = {"prompt": "\n\nHuman: Hi\n\nAssistant: Hey!\n\nHuman: Bye\n\nAssistant:", "chosen": " Goodbye!", "rejected": " Whatever."}
    (p,), _ = load(tmp_path, [row])
    assert p == PreferencePair((("user", "Hi"), ("assistant", "Hey!"), ("user", "Bye")), "Goodbye!", "Whatever.", "all")


def test_conversational_message_lists_with_and_without_prompt(tmp_path):
    user = {"role": "user", "content": "Name a color."}
    implicit = {"chosen": [user, {"role": "assistant", "content": "Blue."}], "rejected": [user, {"role": "assistant", "content": "Dog."}]}
    explicit = {"prompt": [user], "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "No."}]}
    both = {"prompt": "Name a color.", **implicit}  # UltraFeedback: a prompt column and whole conversations
    pairs, _ = load(tmp_path, [implicit, explicit, both])
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ((("user", "Name a color."),), "Blue.", "Dog."),
        ((("user", "Name a color."),), "Red.", "No."),
        ((("user", "Name a color."),), "Blue.", "Dog."),
    ]


@pytest.mark.parametrize(
    "row,problem",
    [
        ({"chosen": "Hello", "rejected": "Bye"}, "field 'prompt' (column 'prompt') is missing or empty, and 'chosen' is not a Human/Assistant dialogue"),
        ({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: x"}, "differ at turn 1, which is not an Assistant turn"),
        ({"chosen": "\n\nHuman: A\n\nAssistant: x\n\nHuman: more", "rejected": "\n\nHuman: A\n\nAssistant: y"}, "'chosen' goes on with a Human turn after its answer"),
        ({"chosen": "\n\nAssistant: x", "rejected": "\n\nAssistant: y"}, "must end with a Human (user) turn"),
        ({"prompt": "Q", "chosen": None, "rejected": "y"}, "field 'chosen' (column 'chosen') is missing"),
        ({"prompt": "Q", "chosen": "same", "rejected": " same"}, "'chosen' and 'rejected' are the same answer"),
        ({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: A\n\nAssistant: x"}, "are the same answer"),
        ({"prompt": {"text": "Q"}, "chosen": "x", "rejected": "y"}, "field 'prompt' (column 'prompt') holds an object, not text"),
        ({"prompt": "Q", "chosen": True, "rejected": "y"}, "field 'chosen' (column 'chosen') holds true/false, not text"),
        ({"prompt": "Q", "chosen": {"a": 1}, "rejected": "y"}, "field 'chosen' (column 'chosen') holds an object, not text"),
        ({"prompt": "Q", "chosen": "x", "rejected": "y", "category": ["c"]}, "field 'category' (column 'category') holds a list"),
        ({"prompt": "Q", "chosen": [{"role": "robot", "content": "x"}], "rejected": "y"}, "field 'chosen': message 1 is not a {role, content} object"),
    ],
)
def test_malformed_records_fail_with_the_row_number(tmp_path, row, problem):
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError) as err:
        load(tmp_path, [good, good, row])
    message = str(err.value)
    assert "p.jsonl: line 3: " in message and problem in message and "data.skip_invalid=true" in message


def test_skip_invalid_counts_what_it_skips(tmp_path):
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    pairs, report = load(tmp_path, [good, {"chosen": "x", "rejected": "y"}, good], skip_invalid=True)
    assert len(pairs) == 2 and report.rows == 3 and report.skipped == 1 and "line 2" in report.skipped_reasons[0]


def test_skip_invalid_skips_identical_answers_and_non_text_values(tmp_path):
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    pairs, report = load(tmp_path, [good, {"prompt": "Q", "chosen": "a", "rejected": "a"}, {"prompt": "Q", "chosen": 1.5, "rejected": "b"}], skip_invalid=True)
    assert len(pairs) == 1 and report.skipped == 2
    assert "line 2" in report.skipped_reasons[0] and "line 3" in report.skipped_reasons[1]


def test_an_explicitly_mapped_prompt_or_category_column_must_exist(tmp_path):
    rows = [{"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: A\n\nAssistant: y", "topic": "t"}]
    assert load(tmp_path, rows)[0][0].category == "all"  # the default names may be absent
    for key, column in (("prompt", "question"), ("category", "topc")):
        with pytest.raises(DataError, match=rf"column '{column}' for field '{key}' \(data.columns.{key}\) not found .*columns: chosen, rejected, topic"):
            load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), {**COLUMNS, key: column})


def test_missing_column_names_the_setting(tmp_path):
    with pytest.raises(DataError, match=r"column 'chosen' for field 'chosen' not found .* set data.columns.chosen=<column>"):
        load(tmp_path, [{"prompt": "Q", "good": "a", "rejected": "b"}])


def test_parse_dialogue_needs_a_dialogue():
    assert parse_dialogue("just text") is None
    assert parse_dialogue("text first\n\nHuman: hi") is None
    assert parse_dialogue("Human: hi\n\nAssistant: ho") == [("user", "hi"), ("assistant", "ho")]


# ----------------------------------------------------------------------------- encoding


MULTI = PreferencePair((("user", "Hi"), ("assistant", "Hello."), ("user", "Name a color.")), "Blue.", "I won't.", "c")


def test_chat_rendering_is_a_conversation_with_a_shared_prompt(tokenizer):
    prompt, chosen, rejected = render_pair(tokenizer, "chat", MULTI)
    assert prompt.count("<|im_start|>user") == 2 and prompt.count("<|im_start|>assistant") == 2  # the last one opens the answer
    assert chosen.startswith("Blue.") and rejected.startswith("I won't.") and chosen.endswith(tokenizer.eos_token + "\n")
    alpaca, chosen, _ = render_pair(tokenizer, "alpaca", MULTI)
    assert "Human: Hi\n\nAssistant: Hello.\n\nHuman: Name a color." in alpaca and chosen == "Blue." + tokenizer.eos_token


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_labels_cover_exactly_each_answer(tokenizer, template):
    (enc,) = encode_preferences(tokenizer, [MULTI], template, 256)
    batch = collate_pairs([enc, enc], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected
    chosen_text = tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    rejected_text = tokenizer.decode(batch["labels"][2][batch["labels"][2] != -100])
    assert chosen_text.startswith("Blue.") and rejected_text.startswith("I won't.") and "color" not in chosen_text
    assert enc.chosen.prompt_len == enc.rejected.prompt_len
    assert enc.chosen.input_ids[: enc.chosen.prompt_len].tolist() == enc.rejected.input_ids[: enc.rejected.prompt_len].tolist()


def test_long_prompts_lose_their_oldest_tokens_not_the_answers(tokenizer):
    long = PreferencePair((("user", "word " * 300),), "Yes.", "No.", "c")
    (enc,) = encode_preferences(tokenizer, [long], "chat", 64)
    assert enc.chosen.input_ids.numel() <= 64 and enc.rejected.input_ids.numel() <= 64
    assert tokenizer.decode(enc.chosen.input_ids[enc.chosen.prompt_len :]).startswith("Yes.")
    assert enc.response_tokens > 0


@given(
    st.integers(0, 300), st.integers(0, 300), st.integers(0, 300), st.integers(16, 256),
)
def test_fit_length_keeps_the_budget_and_the_ends_it_promises(p, c, r, max_length):
    prompt, chosen, rejected = list(range(p)), list(range(1000, 1000 + c)), list(range(2000, 2000 + r))
    fp, fc, fr = fit_length(prompt, chosen, rejected, max_length)
    assert len(fp) + len(fc) <= max_length and len(fp) + len(fr) <= max_length
    assert fp == prompt[len(prompt) - len(fp) :]  # the prompt keeps its end
    assert fc == chosen[: len(fc)] and fr == rejected[: len(fr)]  # answers keep their start
    if p + max(c, r) <= max_length:
        assert (fp, fc, fr) == (prompt, chosen, rejected)
    else:
        assert len(fp) >= min(p, max_length // 2)  # the prompt gives way only down to half the budget
        assert len(fc) >= min(c, max_length - max_length // 2)  # and the answers keep at least the other half
        assert len(fr) >= min(r, max_length - max_length // 2)
