"""Read rows from local files or the Hugging Face hub, and validate them into examples.

Every row keeps its place in the source (``line 17`` of a JSON Lines or CSV file, ``record 17``
of a JSON, Parquet or hub dataset), so a problem is reported with the file, the row and the
field, and what to do about it.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO, TypeVar

from fedtune.data.categories import first_word_categories
from fedtune.errors import DataError

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One instruction-tuning example."""

    instruction: str
    input: str
    output: str
    category: str


@dataclass
class LoadReport:
    """What loading found: where from, how many rows, which were skipped and why."""

    source: str
    rows: int
    skipped: int = 0
    skipped_reasons: tuple[str, ...] = ()


Row = tuple[str, dict]  # (place in the source, e.g. "line 3", row)


def read_rows(path: str, split: str = "train", subset: Optional[str] = None) -> tuple[str, Iterator[Row]]:
    """Return a printable source name and an iterator over its rows.

    ``path`` is a .jsonl/.json/.csv/.parquet file, a folder (``datasets.save_to_disk`` output
    or a folder of data files) or a Hugging Face hub dataset name.
    """
    p = Path(path).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
        if suffix not in readers:
            raise DataError(f"{p}: unsupported file type '{suffix}'; use one of {', '.join(FILE_SUFFIXES)}")
        return str(p), readers[suffix](p)
    if p.is_dir():
        return str(p), _hub_rows(str(p), split, subset, folder=True)
    if p.suffix.lower() in FILE_SUFFIXES or path.startswith((".", "/", "~")):
        raise DataError(f"data file {p} not found; check data.path")
    return path, _hub_rows(path, split, subset, folder=False)


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with _text_file(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({err.msg}); fix or remove the line") from None


def _json_rows(path: Path) -> Iterator[Row]:
    with _text_file(path) as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines saved as .json
            yield from _jsonl_rows(path)
            return
        raise DataError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    for i, row in enumerate(data, start=1):
        yield f"record {i}", row


def _csv_rows(path: Path) -> Iterator[Row]:
    with _text_file(path, newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            yield f"line {reader.line_num}", row


@contextmanager
def _text_file(path: Path, newline: Optional[str] = None) -> Iterator[TextIO]:
    """``path`` opened as UTF-8 text (a leading byte-order mark, as Excel and Notepad write, is
    dropped); a file that cannot be read or decoded is a DataError naming the file (and the
    line and byte that are not UTF-8), never the text itself."""
    try:
        with path.open(encoding="utf-8-sig", newline=newline) as fh:
            yield fh
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: {not_utf8(path, err)}; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err}); check data.path and the file's permissions") from None


def not_utf8(path: Path, err: UnicodeDecodeError) -> str:
    """Where ``path`` first fails to decode as UTF-8: ``line 3, byte 0xe9 at column 7``."""
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return f"line {lineno} is not UTF-8 (byte 0x{line[bad.start]:02x} at column {bad.start + 1})"
    return f"not UTF-8 ({err.reason})"


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read Parquet file ({err})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"record {i}", row


def _hub_rows(name: str, split: str, subset: Optional[str], folder: bool) -> Iterator[Row]:
    import datasets

    try:
        saved = folder and any((Path(name) / f).exists() for f in ("dataset_info.json", "state.json"))
        if saved:
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # datasets raises many types; all mean "cannot load this"
        where = "folder" if folder else "Hugging Face hub dataset"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"cannot load {where} '{name}' (split '{split}'): {reason}; check data.path/data.split, "
            "or download it and pass a local .jsonl/.csv/.parquet file"
        ) from None
    rows = iter(ds)
    for i in itertools.count(1):
        try:
            row = next(rows)
        except StopIteration:
            return
        except UnicodeDecodeError as err:  # pyarrow decodes lazily: a non-UTF-8 file in a folder fails here
            raise DataError(
                f"'{name}': record {i} is not UTF-8 text (byte 0x{err.object[err.start]:02x}); save its file as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8)"
            ) from None
        yield f"record {i}", row


def text_value(value: object, field: str, column: str) -> Optional[str]:
    """A field's text: a string as it is, an integer as its digits (a label or a numeric
    answer reads the same either way), None when absent (missing, null or NaN).

    Anything else (a list, an object, true/false, a fractional number) would be trained on
    as its Python spelling, which is not what the file says: a :class:`RowProblem` naming the
    field and column (never the value, which may be private data).
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float) and value != value:  # NaN from CSV/Parquet
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = {bool: "true/false", float: "a fractional number", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    raise RowProblem(f"field '{field}' (column '{column}') holds {kind}, not text (convert it to a string)")


class RowProblem(Exception):
    """Raised by a row parser for a row that lacks what the task needs (the message names the field)."""


def collect(
    source: str,
    rows: Iterator[Row],
    parse: Callable[[dict, bool], T],
    *,
    skip_invalid: bool = False,
    limit: Optional[int] = None,
) -> tuple[list[T], LoadReport]:
    """Parse rows into records with ``parse(row, is_first_row)``.

    A row that is not an object, or whose parser raises :class:`RowProblem`, fails the load
    with the source, the row and the problem, or is skipped and counted with ``skip_invalid``.
    At most ``limit`` records are kept.
    """
    records: list[T] = []
    reasons: list[str] = []
    total = 0
    for where, row in rows:
        total += 1
        try:
            if not isinstance(row, dict):
                raise RowProblem(f"expected an object with fields, got {type(row).__name__}")
            records.append(parse(row, total == 1))
        except RowProblem as problem:
            message = f"{source}: {where}: {problem}"
            if not skip_invalid:
                raise DataError(f"{message}; fix the row or set data.skip_invalid=true to skip such rows") from None
            reasons.append(message)
            continue
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{source}: no usable rows (read {total}); check data.path and data.columns")
    if reasons:
        log.warning("%s: skipped %d invalid rows (first: %s)", source, len(reasons), reasons[0])
    return records, LoadReport(source, total, len(reasons), tuple(reasons[:5]))


def load_examples(
    path: str,
    columns: dict[str, str],
    *,
    split: str = "train",
    subset: Optional[str] = None,
    skip_invalid: bool = False,
    limit: Optional[int] = None,
    instruction_categories: Optional[int] = None,
) -> tuple[list[Example], LoadReport]:
    """Load and validate instruction examples.

    Args:
        columns: source column for each of ``instruction``, ``output`` (required),
            ``input`` and ``category`` (optional: read as empty where a row lacks them, but a
            column mapped to another name must appear in some row).
        skip_invalid: skip rows with a missing or empty required field instead of failing.
        limit: keep only the first ``limit`` valid rows.
        instruction_categories: derive each row's category from its instruction's first word
            instead of the category column: the N most frequent first words, the rest ``other``
            (``categories.first_word_categories``; for data without categories, e.g. Alpaca).

    Raises:
        DataError: naming the file, the row and the field (a missing one, or one holding a
            list, an object or true/false instead of text), unless ``skip_invalid``.
    """
    source, rows = read_rows(path, split, subset)
    required = ("instruction", "output")
    seen: set[str] = set()

    def parse(row: dict, first: bool) -> Example:
        if first:
            check_columns(source, row, columns, required)
        seen.update(row)
        values = {key: text_value(row.get(col), key, col) for key, col in columns.items()}
        missing = [k for k in required if not (values.get(k) or "").strip()]
        if missing:
            raise RowProblem(f"field '{missing[0]}' (column '{columns[missing[0]]}') is missing or empty")
        return Example(
            instruction=values["instruction"].strip(),
            input=(values.get("input") or "").strip(),
            output=values["output"].strip(),
            category=(values.get("category") or "").strip() or "all",
        )

    examples, report = collect(source, rows, parse, skip_invalid=skip_invalid, limit=limit)
    check_mapped(source, seen, columns, ("input", "category"))
    if instruction_categories is not None:
        examples = first_word_categories(examples, instruction_categories)
    return examples, report


def check_mapped(source: str, seen: set[str], columns: dict[str, str], optional: tuple[str, ...]) -> None:
    """An optional field mapped to a column of another name (``data.columns.input=context``)
    must find that column in some row: a typo would otherwise read as empty without a word.
    The defaults map each field to its own name (config.ColumnsConfig), which a file may lack."""
    for key in optional:
        column = columns.get(key)
        if column is not None and column != key and column not in seen:
            have = ", ".join(sorted(map(str, seen))) or "none"
            raise DataError(
                f"{source}: column '{column}' for field '{key}' (data.columns.{key}) not found in the rows read "
                f"(columns: {have}); fix the name or reset it with ~data.columns.{key}"
            )


def check_columns(source: str, row: dict, columns: dict[str, str], required: tuple[str, ...]) -> None:
    for key in required:
        if columns[key] not in row:
            have = ", ".join(map(str, row)) or "none"
            raise DataError(
                f"{source}: column '{columns[key]}' for field '{key}' not found (columns: {have}); "
                f"set data.columns.{key}=<column>"
            )
