import csv
import json

import pytest

from fedtune.data.sources import load_examples
from fedtune.errors import DataError

ALPACA = {"instruction": "instruction", "input": "input", "output": "output", "category": "category"}
DOLLY = {"instruction": "instruction", "input": "context", "output": "response", "category": "category"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Say hi", "input": "", "output": "Hi"},
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
    ])
    examples, report = load_examples(str(f), ALPACA)
    assert [e.instruction for e in examples] == ["Say hi", "Add"]
    assert examples[1].input == "1 and 2"
    assert examples[0].category == "all"  # no category column: one category
    assert report.rows == 2 and report.skipped == 0


def test_dolly_column_mapping(tmp_path):
    f = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Who?", "context": "Ann met Bob.", "response": "Ann", "category": "closed_qa"},
    ])
    (e,), _ = load_examples(str(f), DOLLY)
    assert (e.input, e.output, e.category) == ("Ann met Bob.", "Ann", "closed_qa")


def test_empty_required_field_names_file_row_and_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "ok", "output": "fine"},
        {"instruction": "ok", "output": "fine"},
        {"instruction": "  ", "output": "fine"},
    ])
    with pytest.raises(DataError) as e:
        load_examples(str(f), ALPACA)
    msg = str(e.value)
    assert "d.jsonl: line 3: field 'instruction' (column 'instruction') is missing or empty" in msg
    assert "data.skip_invalid=true" in msg


def test_skip_invalid_counts_and_reports(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "a", "output": "b"},
        {"instruction": "a", "output": None},
        {"instruction": "c", "output": "d"},
        {"output": "x"},
    ])
    examples, report = load_examples(str(f), ALPACA, skip_invalid=True)
    assert len(examples) == 2
    assert report.skipped == 2
    assert "line 2" in report.skipped_reasons[0] and "line 4" in report.skipped_reasons[1]


def test_missing_column_says_which_setting_to_change(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"column 'output' for field 'output' not found \(columns: instruction, response\); set data.columns.output"):
        load_examples(str(f), ALPACA)


def test_bad_json_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match="d.jsonl: line 2: not valid JSON"):
        load_examples(str(f), ALPACA)


def test_json_list_and_jsonl_named_json(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows))
    with pytest.raises(DataError, match="record 2: field 'output'"):
        load_examples(str(f), ALPACA)
    g = write_jsonl(tmp_path / "e.json", rows[:1] * 3)
    assert len(load_examples(str(g), ALPACA)[0]) == 3


def test_csv_reports_file_lines(tmp_path):
    f = tmp_path / "d.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["a", "", "b"])
        w.writerow(["c", "", ""])
    with pytest.raises(DataError, match="d.csv: line 3: field 'output'"):
        load_examples(str(f), ALPACA)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", "y"], "category": ["k", "l"]}), f)
    examples, _ = load_examples(str(f), ALPACA)
    assert [e.category for e in examples] == ["k", "l"]


def test_dataset_folder_through_datasets_library(tmp_path):
    """A folder of data files loads through `datasets.load_dataset`, the hub code path."""
    folder = tmp_path / "myset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    examples, report = load_examples(str(folder), ALPACA, split="train")
    assert len(examples) == 4 and report.source == str(folder)


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"instruction": "a", "output": "b"}] * 2).save_to_disk(str(tmp_path / "saved"))
    assert len(load_examples(str(tmp_path / "saved"), ALPACA)[0]) == 2


def test_missing_file_and_unknown_hub_name(tmp_path):
    with pytest.raises(DataError, match="not found; check data.path"):
        load_examples(str(tmp_path / "nope.jsonl"), ALPACA)
    with pytest.raises(DataError, match="cannot load Hugging Face hub dataset 'no-such-user/no-such-set'"):
        load_examples("no-such-user/no-such-set", ALPACA)


def test_limit(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": str(i), "output": "o"} for i in range(10)])
    assert len(load_examples(str(f), ALPACA, limit=4)[0]) == 4


@pytest.mark.parametrize(
    "value,kind",
    [(["a", "b"], "a list"), ({"text": "a"}, "an object"), (True, "true/false"), (0.5, "a fractional number")],
)
def test_a_non_text_value_names_file_row_and_column(tmp_path, value, kind):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "a", "response": value}])
    with pytest.raises(DataError) as e:
        load_examples(str(f), {**ALPACA, "output": "response"})
    msg = str(e.value)
    assert f"d.jsonl: line 2: field 'output' (column 'response') holds {kind}, not text" in msg
    assert "data.skip_invalid=true" in msg and "'text'" not in msg  # the value itself is never shown


def test_integers_read_as_their_digits_and_non_text_rows_can_be_skipped(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "2+2?", "output": 4, "category": 7},
        {"instruction": ["x"], "output": "b"},
        {"instruction": "a", "output": "b", "input": {"k": 1}},
    ])
    examples, report = load_examples(str(f), ALPACA, skip_invalid=True)
    assert [(e.output, e.category) for e in examples] == [("4", "7")]
    assert report.skipped == 2 and "field 'instruction'" in report.skipped_reasons[0] and "field 'input'" in report.skipped_reasons[1]


def test_an_explicitly_mapped_optional_column_must_exist(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b", "topic": "t"}, {"instruction": "c", "output": "d"}])
    assert load_examples(str(f), ALPACA)[0][0].input == ""  # the default names may be absent
    for key, column in (("input", "context"), ("category", "topc")):
        with pytest.raises(DataError, match=rf"d.jsonl: column '{column}' for field '{key}' \(data.columns.{key}\) not found .*\(columns: instruction, output, topic\)"):
            load_examples(str(f), {**ALPACA, key: column})
    (e, _), _ = load_examples(str(f), {**ALPACA, "category": "topic"})  # found in some row: rows without it read as "all"
    assert e.category == "t"


def test_a_non_utf8_file_inside_a_data_folder_is_one_data_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_bytes(json.dumps({"instruction": "q", "output": "Müller 12345"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"record 1 is not UTF-8 text \(byte 0xfc\); save its file as UTF-8") as e:
        load_examples(str(tmp_path / "d"), ALPACA)
    assert "12345" not in str(e.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_utf8_byte_order_mark_is_read_as_utf8(tmp_path, suffix):
    text = "instruction,output\nq,a\n" if suffix == ".csv" else json.dumps({"instruction": "q", "output": "a"}) + "\n"
    f = tmp_path / f"bom{suffix}"
    f.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # as Excel and Notepad save
    (example,), _ = load_examples(str(f), ALPACA)
    assert (example.instruction, example.output) == ("q", "a")

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_file_that_is_not_utf8_names_the_line_not_the_text(tmp_path, suffix):
    secret = "Müller's salary is 12345"
    if suffix == ".csv":
        text = f"instruction,output\nfine,ok\nq,{secret}\n"
    else:
        rows = [{"instruction": "fine", "output": "ok"}, {"instruction": "q", "output": secret}]
        text = json.dumps(rows, ensure_ascii=False).replace("}, {", "},\n{") if suffix == ".json" else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    f = tmp_path / f"d{suffix}"
    f.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_examples(str(f), ALPACA)
    msg = str(e.value)
    assert f"d{suffix}: line {3 if suffix == '.csv' else 2} is not UTF-8 (byte 0xfc at column" in msg and "save the file as UTF-8" in msg
    assert "salary" not in msg


def test_an_unreadable_file_is_a_data_error(tmp_path, monkeypatch):
    from pathlib import Path

    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)  # chmod 0 does not stop root
    with pytest.raises(DataError, match=r"d.jsonl: cannot read the file \(Permission denied\); check data.path"):
        load_examples(str(f), ALPACA)
