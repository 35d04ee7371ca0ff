"""Question-answer datasets: one loader for the formats users bring, with errors that name the line.

    examples, report = load_qa("../shared/data/medquad/qa.jsonl.gz", limit=2000)
    print(report.describe())
    train, test = split_train_test(examples, test_fraction=0.1)

A source is ``demo`` (the built-in Python standard-library domain, see ``demo.py``), a file
(``.jsonl``, ``.json``, ``.csv``, ``.parquet``, each optionally ``.gz``), a folder written by
``datasets``' ``save_to_disk``, or a Hugging Face hub id (``datasets.load_dataset``).

A row holds either a question and an answer field, or a chat under ``messages``
([{"role", "content"}, ...]) whose last message is the assistant's answer to the last user message
before it, with an optional leading system prompt. Bad rows stop the load with a ``DataError`` that
names the file, the line and the field; nothing is skipped silently. Exact repeats of a
(question, answer) pair are dropped and counted.

Every sample gets a key, ``stable_hash({"q": question, "a": answer})``, that names it in every file
the later stages write.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from raftune.files import stable_hash

DEMO = "demo"
FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")  # each may also end in .gz
_READ_ERRORS = (OSError, EOFError, zlib.error)  # unreadable or truncated (gzip) files
_WHAT_TO_PASS = ("pass a local file (.jsonl, .json, .csv or .parquet, optionally .gz), a folder "
                 "written by datasets' save_to_disk, or 'demo'")


class DataError(ValueError):
    """Bad input. str() is f"{path}:{line}: field '{field}': {message}"; the line and field parts are
    left out when None."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str):
        super().__init__(path, line, field, message)  # all four in args, so it pickles
        self.path, self.line, self.field, self.message = path, line, field, message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        field = "" if self.field is None else f" field '{self.field}':"
        return f"{where}:{field} {self.message}"


@dataclass(frozen=True)
class QAExample:
    key: str  # stable_hash({"q": question, "a": answer}): names the sample in every stage's files
    question: str
    answer: str
    source: str  # "path:line", or "hub-id[split]:row", where the row came from
    system: str | None = None  # system prompt, from chat rows


@dataclass(frozen=True)
class LoadReport:
    source: str
    n_rows: int  # rows read (blank lines are not rows)
    n_kept: int
    n_duplicate_pairs: int  # rows repeating an earlier (question, answer) pair
    n_duplicate_questions: int  # distinct questions seen with more than one answer (all kept)
    duplicates_kept: bool = False

    def describe(self) -> str:
        fate = "kept" if self.duplicates_kept else "dropped"
        return (f"{self.source}: {_count(self.n_rows, 'row')}, {self.n_kept} kept, "
                f"{_count(self.n_duplicate_pairs, 'duplicate pair')} {fate}, "
                f"{_count(self.n_duplicate_questions, 'question')} with several answers")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# --- reading rows: each reader yields (number, row) with the number errors should report ---------

def _type_name(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
             list: "a list", dict: "an object", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _gzipped(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def _decode(raw: bytes, label: str, line: int | None) -> str:
    try:
        return raw.decode("utf-8-sig" if line in (None, 1) else "utf-8")
    except UnicodeDecodeError as e:
        if line is None:  # whole file: find the line of the bad byte
            line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(label, line, None, f"not UTF-8 text ({e.reason})") from None


def _jsonl_rows(label: str, lines: Iterable[bytes]) -> Iterator[tuple[int, Any]]:
    n = 0
    try:
        for n, raw in enumerate(lines, start=1):
            text = _decode(raw, label, n)
            if not text.strip():
                continue
            try:
                yield n, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(label, n, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
    except _READ_ERRORS as e:
        raise DataError(label, n + 1, None, f"cannot read the file: {e}") from e


def _jsonl_file(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    opener = gzip.open if _gzipped(path) else open
    with opener(path, "rb") as f:  # bytes split on b"\n" only: the line numbers an editor shows
        yield from _jsonl_rows(label, f)


def _read_bytes(path: Path, label: str) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if _gzipped(path) else path.read_bytes()
    except _READ_ERRORS as e:
        raise DataError(label, None, None, f"cannot read the file: {e}") from e


def _json_rows(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    data = _read_bytes(path, label)
    text = _decode(data, label, None)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines under a .json name
            yield from _jsonl_rows(label, io.BytesIO(data))
            return
        raise DataError(label, e.lineno, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(rows, list):
        raise DataError(label, None, None, f"expected a JSON array of rows, got {_type_name(rows)}")
    yield from enumerate(rows, start=1)


def _csv_rows(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    opener = gzip.open if _gzipped(path) else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(label, None, None, "empty file: expected a header row")
            header = [name.strip() for name in header]
            for values in reader:
                if not values:  # blank line
                    continue
                if len(values) > len(header):
                    raise DataError(label, reader.line_num, None,
                                    f"{len(values)} values but the header has {len(header)} columns")
                yield reader.line_num, dict(zip(header, values))  # a short row lacks its last fields
        except csv.Error as e:
            raise DataError(label, reader.line_num, None, f"malformed CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError(label, reader.line_num + 1, None, f"not UTF-8 text ({e.reason})") from None
        except _READ_ERRORS as e:
            raise DataError(label, reader.line_num + 1, None, f"cannot read the file: {e}") from e


def _parquet_rows(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa  # comes with datasets
    import pyarrow.parquet as pq

    try:
        source = pa.BufferReader(_read_bytes(path, label)) if _gzipped(path) else str(path)
        parquet = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as e:
        raise DataError(label, None, None, f"not a readable Parquet file ({e})") from e
    n = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _saved_dataset(path: Path, label: str, split: str):
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(label, None, None, f"not a folder written by save_to_disk ({e}); "
                        "pass one of the data files in it instead") from e
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(label, None, None, f"no split '{split}' (it has: {', '.join(dataset)})")
        dataset, label = dataset[split], f"{label}[{split}]"
    return label, enumerate(dataset, start=1)


def _hub_dataset(source: str, split: str):
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown or private id, bad split: the same advice for all
        raise DataError(source, None, None, f"could not fetch this dataset from the Hugging Face hub "
                        f"({type(e).__name__}: {e}), and it is no local file or folder; "
                        f"{_WHAT_TO_PASS}") from e
    return f"{source}[{split}]", enumerate(dataset, start=1)


def _file_format(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return next((fmt for fmt in FILE_FORMATS if name.endswith(fmt)), None)


def _open_source(source: str, split: str) -> tuple[str, Iterator[tuple[int, Any]], str | None]:
    """(label for messages, rows, what a row number counts when not physical lines)."""
    if source == DEMO:
        from raftune.demo import build_demo

        return DEMO, enumerate(build_demo(), start=1), "row"
    path = Path(source).expanduser()
    if path.is_dir():
        label, rows = _saved_dataset(path, source, split)
        return label, rows, "row"
    fmt = _file_format(path)
    if fmt is not None:
        if not path.is_file():
            raise DataError(source, None, None, "no such file")
        if fmt == ".jsonl":
            return source, _jsonl_file(path, source), None
        if fmt == ".json":
            return source, _json_rows(path, source), "item"
        if fmt == ".csv":
            return source, _csv_rows(path, source), None
        return source, _parquet_rows(path, source), "row"
    if path.exists():
        raise DataError(source, None, None, f"unsupported file type; {_WHAT_TO_PASS}")
    # A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path.
    if source.count("/") > 1 or "\\" in source or source.startswith((".", "~", "/")):
        raise DataError(source, None, None, "no such file or folder")
    label, rows = _hub_dataset(source, split)
    return label, rows, "row"


# --- turning rows into examples -------------------------------------------------------------------

class _RowError(Exception):
    def __init__(self, field: str | None, message: str):
        self.field, self.message = field, message


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise _RowError(field, "empty")
    return value.strip()


def _from_chat(messages: Any, field: str) -> tuple[str, str, str | None]:
    if not isinstance(messages, list):
        raise _RowError(field, f"expected a list of {{role, content}} messages, "
                        f"got {_type_name(messages)}")
    if not messages:
        raise _RowError(field, "empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _RowError(f"{field}[{i}]", f"expected an object with role and content, "
                            f"got {_type_name(message)}")
        for part in ("role", "content"):
            if part not in message:
                raise _RowError(f"{field}[{i}].{part}", "missing")
            if not isinstance(message[part], str):
                raise _RowError(f"{field}[{i}].{part}",
                                f"expected a string, got {_type_name(message[part])}")
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise _RowError(f"{field}[{last}].role", "the last message must be the assistant's answer, "
                        f"got role '{messages[last]['role']}'")
    users = [i for i in range(last) if messages[i]["role"] == "user"]
    if not users:
        raise _RowError(field, "no user message before the assistant's answer")
    question = _text(messages[users[-1]]["content"], f"{field}[{users[-1]}].content")
    answer = _text(messages[last]["content"], f"{field}[{last}].content")
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else ""
    return question, answer, system or None  # an empty system prompt is no system prompt


def _parse_row(row: Any, question_field: str, answer_field: str,
               messages_field: str) -> tuple[str, str, str | None]:
    if not isinstance(row, dict):
        raise _RowError(None, f"expected an object, got {_type_name(row)}")
    if question_field in row or answer_field in row:
        for field in (question_field, answer_field):
            if field not in row:
                raise _RowError(field, f"missing (the row has: {', '.join(map(str, row))})")
        return _text(row[question_field], question_field), _text(row[answer_field], answer_field), None
    if messages_field in row:
        return _from_chat(row[messages_field], messages_field)
    if "instruction" in row and "output" in row:  # Alpaca's format: instruction (+ input) -> output
        question = _text(row["instruction"], "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise _RowError("input", f"expected a string, got {_type_name(extra)}")
        return (f"{question}\n\n{extra.strip()}" if extra.strip() else question), _text(row["output"], "output"), None
    raise _RowError(question_field, f"missing (the row has: {', '.join(map(str, row))}; expected "
                    f"'{question_field}' and '{answer_field}', '{messages_field}', or Alpaca's instruction and output)")


def load_qa(source: str, *, question_field: str = "question", answer_field: str = "answer",
            messages_field: str = "messages", split: str = "train", limit: int | None = None,
            keep_duplicates: bool = False) -> tuple[list[QAExample], LoadReport]:
    """The examples of ``source`` in file order, and what loading them found.

    ``limit`` keeps the first N examples after duplicates are dropped; reading stops there, so the
    report's counts describe the rows read. ``split`` picks the split of a hub id or of a saved
    ``DatasetDict``. Raises ``DataError`` on the first bad row, and when there is no row at all.
    """
    source = os.fspath(source)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if source == DEMO:  # the demo's records have the default field names
        question_field, answer_field, messages_field = "question", "answer", "messages"
    label, rows, unit = _open_source(source, split)
    examples: list[QAExample] = []
    seen_pairs: set[tuple[str, str]] = set()
    first_answer: dict[str, str] = {}
    several_answers: set[str] = set()
    n_rows = n_duplicate_pairs = 0
    try:
        for number, row in rows:
            n_rows += 1
            try:
                question, answer, system = _parse_row(row, question_field, answer_field, messages_field)
            except _RowError as e:
                note = "" if unit is None else f" ({unit} {number})"
                raise DataError(label, number, e.field, e.message + note) from None
            if first_answer.setdefault(question, answer) != answer:
                several_answers.add(question)
            if (question, answer) in seen_pairs:
                n_duplicate_pairs += 1
                if not keep_duplicates:
                    continue
            seen_pairs.add((question, answer))
            examples.append(QAExample(key=stable_hash({"q": question, "a": answer}), question=question,
                                      answer=answer, source=f"{label}:{number}", system=system))
            if limit is not None and len(examples) >= limit:
                break
    finally:
        close = getattr(rows, "close", None)  # a generator holding a file open
        if close is not None:
            close()
    if not examples:
        raise DataError(label, None, None, "no rows")
    report = LoadReport(source=label, n_rows=n_rows, n_kept=len(examples),
                        n_duplicate_pairs=n_duplicate_pairs,
                        n_duplicate_questions=len(several_answers), duplicates_kept=keep_duplicates)
    return examples, report


def split_train_test(examples: list[QAExample], test_fraction: float = 0.1,
                     seed: int = 0) -> tuple[list[QAExample], list[QAExample]]:
    """(train, test), each in the input's order. Which examples go to test depends only on their keys
    and the seed, not on the input order: the round(test_fraction * n) lowest
    ``stable_hash((seed, key))`` are the test set."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = round(test_fraction * len(examples))
    ranked = sorted(range(len(examples)), key=lambda i: (stable_hash((seed, examples[i].key)), i))
    in_test = set(ranked[:n_test])
    train = [ex for i, ex in enumerate(examples) if i not in in_test]
    test = [ex for i, ex in enumerate(examples) if i in in_test]
    return train, test


def examples_to_rows(examples: Iterable[QAExample]) -> list[dict]:
    """JSONL rows {"key", "question", "answer"} (and "system" when there is one)."""
    rows = []
    for ex in examples:
        row = {"key": ex.key, "question": ex.question, "answer": ex.answer}
        if ex.system is not None:
            row["system"] = ex.system
        rows.append(row)
    return rows
