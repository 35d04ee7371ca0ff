"""Loading QA files: every format, every bad input named by file, line and field, duplicates, splits."""
from __future__ import annotations

import csv
import gzip
import json
import pickle
import random
from pathlib import Path

import pytest

from raftune.data import (
    DataError,
    LoadReport,
    QAExample,
    examples_to_rows,
    load_qa,
    split_train_test,
)
from raftune.files import stable_hash

MEDQUAD = Path(__file__).parents[2] / "shared" / "data" / "medquad" / "qa.jsonl.gz"

ROWS = [
    {"question": "What is RAFT?", "answer": "A way to fine-tune a model on a domain.", "id": 1},
    {"question": "  Why keep general skills?  ", "answer": "\nSo the model stays useful.\n"},
    {"question": "What is a key?", "answer": "A hash of the question and answer."},
]
PAIRS = [("What is RAFT?", "A way to fine-tune a model on a domain."),
         ("Why keep general skills?", "So the model stays useful."),
         ("What is a key?", "A hash of the question and answer.")]


def write_jsonl(path: Path, rows: list, blank_after_first: bool = False) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "   ")
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def pairs(examples: list[QAExample]) -> list[tuple[str, str]]:
    return [(ex.question, ex.answer) for ex in examples]


def load_error(source, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load_qa(str(source), **kwargs)
    return info.value


# --- formats --------------------------------------------------------------------------------------

def test_jsonl_strips_skips_blank_lines_and_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", ROWS, blank_after_first=True)
    examples, report = load_qa(str(path))
    assert pairs(examples) == PAIRS
    assert [ex.source for ex in examples] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert examples[0].key == stable_hash({"q": PAIRS[0][0], "a": PAIRS[0][1]})
    assert all(ex.system is None for ex in examples)
    assert report == LoadReport(str(path), n_rows=3, n_kept=3, n_duplicate_pairs=0,
                                n_duplicate_questions=0)


def test_gzip_json_csv_and_parquet_give_the_same_examples(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    reference, _ = load_qa(str(write_jsonl(tmp_path / "qa.jsonl", ROWS)))

    sources = [write_jsonl(tmp_path / "qa.jsonl.gz", ROWS)]
    sources.append(tmp_path / "qa.json")
    sources[-1].write_text(json.dumps(ROWS, indent=2))
    sources.append(tmp_path / "qa.json.gz")
    sources[-1].write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    sources.append(write_csv(tmp_path / "qa.csv", ["question", "answer"],
                             [[r["question"], r["answer"]] for r in ROWS]))
    sources.append(tmp_path / "qa.csv.gz")
    sources[-1].write_bytes(gzip.compress(sources[-2].read_bytes()))
    table = pa.Table.from_pylist([{"question": r["question"], "answer": r["answer"]} for r in ROWS])
    sources.append(tmp_path / "qa.parquet")
    pq.write_table(table, sources[-1])
    sources.append(tmp_path / "qa.parquet.gz")
    sources[-1].write_bytes(gzip.compress(sources[-2].read_bytes()))

    for source in sources:
        examples, report = load_qa(str(source))
        assert [ex.key for ex in examples] == [ex.key for ex in reference], source
        assert report.n_kept == 3
    assert load_qa(str(tmp_path / "qa.json"))[0][2].source == f"{tmp_path / 'qa.json'}:3"
    assert load_qa(str(tmp_path / "qa.parquet"))[0][2].source == f"{tmp_path / 'qa.parquet'}:3"


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = write_jsonl(tmp_path / "qa.json", ROWS)
    examples, _ = load_qa(str(path))
    assert pairs(examples) == PAIRS


def test_csv_multiline_field_and_custom_columns(tmp_path):
    path = write_csv(tmp_path / "qa.csv", ["id", "prompt", "response"],
                     [["1", "Two\nlines?", "Yes"], ["2", "Next?", "Row on line 4"]])
    examples, _ = load_qa(str(path), question_field="prompt", answer_field="response")
    assert pairs(examples) == [("Two\nlines?", "Yes"), ("Next?", "Row on line 4")]
    assert [ex.source for ex in examples] == [f"{path}:3", f"{path}:4"]


def test_saved_dataset_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    flat = [{"question": r["question"], "answer": r["answer"]} for r in ROWS]
    datasets.Dataset.from_list(flat).save_to_disk(str(tmp_path / "single"))
    examples, _ = load_qa(str(tmp_path / "single"))
    assert pairs(examples) == PAIRS
    assert examples[1].source == f"{tmp_path / 'single'}:2"

    datasets.DatasetDict({"train": datasets.Dataset.from_list(flat[:2]),
                          "test": datasets.Dataset.from_list(flat[2:])}).save_to_disk(
        str(tmp_path / "dict"))
    examples, report = load_qa(str(tmp_path / "dict"), split="test")
    assert pairs(examples) == PAIRS[2:]
    assert examples[0].source == f"{tmp_path / 'dict'}[test]:1"
    assert report.source == f"{tmp_path / 'dict'}[test]"
    error = load_error(tmp_path / "dict", split="validation")
    assert "no split 'validation'" in str(error) and "train" in str(error)


def test_chat_rows(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": " Be brief. "},
                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": " What is 2+2? "},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "No system?"},
                      {"role": "assistant", "content": "None."}]},
        {"messages": [{"role": "system", "content": "  "}, {"role": "user", "content": "Empty system?"},
                      {"role": "assistant", "content": "Dropped."}]},
    ]
    examples, _ = load_qa(str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    assert pairs(examples) == [("What is 2+2?", "4"), ("No system?", "None."),
                               ("Empty system?", "Dropped.")]
    assert [ex.system for ex in examples] == ["Be brief.", None, None]
    assert examples[0].key == stable_hash({"q": "What is 2+2?", "a": "4"})
    assert examples_to_rows(examples[:2]) == [
        {"key": examples[0].key, "question": "What is 2+2?", "answer": "4", "system": "Be brief."},
        {"key": examples[1].key, "question": "No system?", "answer": "None."}]

    conv = [{"conv": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    examples, _ = load_qa(str(write_jsonl(tmp_path / "conv.jsonl", conv)), messages_field="conv")
    assert pairs(examples) == [("Q", "A")]


# --- bad input: file, line and field ------------------------------------------------------------

GOOD = json.dumps({"question": "Q?", "answer": "A."})


def msgs(*pairs_: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs_]}


JSONL_ERRORS = [  # (lines, line, field, words in the message)
    ([GOOD, GOOD, '{"question": "Q?", "answer": '], 3, None, "malformed JSON"),
    ([GOOD, "[1, 2]"], 2, None, "expected an object, got a list"),
    ([GOOD, '{"question": "Q?"}'], 2, "answer", "missing"),
    ([GOOD, '{"question": "Q?", "answer": 42}'], 2, "answer", "expected a string, got a number"),
    ([GOOD, '{"question": null, "answer": "A."}'], 2, "question", "got null"),
    (['{"question": " \\t ", "answer": "A."}'], 1, "question", "empty"),
    ([GOOD, '{"text": "neither"}'], 2, "question", "expected 'question' and 'answer', 'messages', or Alpaca's instruction and output"),
    ([GOOD, "", json.dumps(msgs(("user", "Q"), ("user", "again")))], 3, "messages[1].role",
     "last message must be the assistant"),
    ([json.dumps({"messages": "Q? A."})], 1, "messages", "expected a list"),
    ([json.dumps({"messages": []})], 1, "messages", "empty"),
    ([json.dumps({"messages": ["hi"]})], 1, "messages[0]", "expected an object"),
    ([json.dumps(msgs(("user", None), ("assistant", "A")))], 1, "messages[0].content", "got null"),
    ([json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]})], 1,
     "messages[0].content", "missing"),
    ([json.dumps(msgs(("system", "S"), ("assistant", "A")))], 1, "messages", "no user message"),
    ([json.dumps(msgs(("user", "Q"), ("assistant", "  ")))], 1, "messages[1].content", "empty"),
]


@pytest.mark.parametrize("lines,line,field,words", JSONL_ERRORS)
def test_jsonl_errors_name_file_line_and_field(tmp_path, lines, line, field, words):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    error = load_error(path)
    assert (error.path, error.line, error.field) == (str(path), line, field)
    prefix = f"{path}:{line}:" + ("" if field is None else f" field '{field}':")
    assert str(error).startswith(prefix) and words in str(error), str(error)


def test_gzipped_jsonl_errors_and_broken_gzip(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl.gz", [GOOD, '{"question": "Q?", "answer": ""}'])
    assert str(load_error(path)).startswith(f"{path}:2: field 'answer': empty")
    upper = tmp_path / "UPPER.JSONL.GZ"
    upper.write_bytes(gzip.compress(b"\n".join(json.dumps(r).encode() for r in ROWS)))
    assert pairs(load_qa(str(upper))[0]) == PAIRS
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    assert "cannot read the file" in str(load_error(broken))


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"question": "Café?", "answer": "A."}\n'.encode("latin-1"))
    error = load_error(path)
    assert error.line == 2 and "not UTF-8" in str(error)


def test_json_array_errors_count_items(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"question": "Q1", "answer": "A1"}, {"question": "Q2", "answer": "A2"},
                                {"question": "Q3"}], indent=2))
    error = load_error(path)
    assert str(error) == f"{path}:3: field 'answer': missing (the row has: question) (item 3)"

    path.write_text('[\n  {"question": "Q", "answer": "A"},\n  {"question": "Q2" "answer": "A2"}\n]')
    error = load_error(path)
    assert (error.line, error.field) == (3, None) and "malformed JSON" in str(error)

    path.write_text('{"data": []}')
    assert "expected a JSON array of rows, got an object" in str(load_error(path))


def test_csv_errors_use_the_readers_line_numbers(tmp_path):
    # The quoted answer spans lines 2-3, so the bad row is on line 4.
    path = tmp_path / "bad.csv"
    path.write_text('question,answer\nQ1,"two\nlines"\nQ2,\n', encoding="utf-8")
    error = load_error(path)
    assert str(error) == f"{path}:4: field 'answer': empty"

    path.write_text("question,answer\nQ1,A1\n\nQ2\n", encoding="utf-8")  # blank line 3 is skipped
    error = load_error(path)
    assert (error.line, error.field) == (4, "answer") and "missing" in str(error)

    path.write_text("question,answer\nQ1,A1,extra\n", encoding="utf-8")
    error = load_error(path)
    assert (error.line, error.field) == (2, None) and "3 values but the header has 2" in str(error)

    path.write_text("prompt,response\nQ1,A1\n", encoding="utf-8")
    error = load_error(path)
    assert (error.line, error.field) == (2, "question") and "prompt, response" in str(error)


def test_parquet_and_dataset_errors_count_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "Q1", "answer": "A1"}, {"question": "Q2", "answer": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    error = load_error(tmp_path / "bad.parquet")
    assert str(error) == f"{tmp_path / 'bad.parquet'}:2: field 'answer': expected a string, got null (row 2)"

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    error = load_error(tmp_path / "saved")
    assert (error.path, error.line, error.field) == (str(tmp_path / "saved"), 2, "answer")

    (tmp_path / "junk.parquet").write_text("not parquet")
    assert "not a readable Parquet file" in str(load_error(tmp_path / "junk.parquet"))


def test_sources_that_do_not_exist_or_do_not_fit(tmp_path):
    for missing in (tmp_path / "nope.jsonl", tmp_path / "nope.csv.gz", "data/nope.parquet"):
        assert str(load_error(missing)) == f"{missing}: no such file"
    assert "no such file or folder" in str(load_error(tmp_path / "no" / "folder"))
    (tmp_path / "notes.txt").write_text("hello")
    assert "unsupported file type" in str(load_error(tmp_path / "notes.txt"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert str(load_error(tmp_path / "empty.jsonl")) == f"{tmp_path / 'empty.jsonl'}: no rows"
    (tmp_path / "empty.csv").write_text("")
    assert "expected a header row" in str(load_error(tmp_path / "empty.csv"))
    with pytest.raises(ValueError, match="limit"):
        load_qa(str(write_jsonl(tmp_path / "ok.jsonl", ROWS)), limit=0)


def test_hub_id_that_cannot_be_fetched_says_what_to_pass(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # Offline mode makes the failure immediate instead of retrying the network for 20 s.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    error = load_error("raftune-test/no-such-dataset")
    message = str(error)
    assert message.startswith("raftune-test/no-such-dataset: could not fetch this dataset")
    assert "Hugging Face hub" in message and "local file" in message and "save_to_disk" in message


def test_data_error_pickles_and_prints_without_line_or_field():
    error = DataError("f.jsonl", 3, "answer", "empty")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) == "f.jsonl:3: field 'answer': empty"
    assert (copy.path, copy.line, copy.field, copy.message) == ("f.jsonl", 3, "answer", "empty")
    assert str(DataError("f.jsonl", 3, None, "bad")) == "f.jsonl:3: bad"
    assert str(DataError("f.jsonl", None, None, "no rows")) == "f.jsonl: no rows"
    assert isinstance(error, ValueError)


# --- duplicates and limit -------------------------------------------------------------------------

DUPLICATED = [
    {"question": "Q1", "answer": "A1"},
    {"question": "Q2", "answer": "A2"},
    {"question": " Q1 ", "answer": "A1"},  # same pair once stripped
    {"question": "Q1", "answer": "another answer"},
    {"question": "Q3", "answer": "A3"},
    {"question": "Q2", "answer": "A2"},
    {"question": "Q4", "answer": "A4"},
]


def test_duplicates_are_counted_and_dropped(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", DUPLICATED)
    examples, report = load_qa(str(path))
    assert pairs(examples) == [("Q1", "A1"), ("Q2", "A2"), ("Q1", "another answer"), ("Q3", "A3"),
                               ("Q4", "A4")]
    assert len({ex.key for ex in examples}) == 5
    assert (report.n_rows, report.n_kept, report.n_duplicate_pairs, report.n_duplicate_questions) == (
        7, 5, 2, 1)
    assert report.describe() == (f"{path}: 7 rows, 5 kept, 2 duplicate pairs dropped, "
                                 "1 question with several answers")

    examples, report = load_qa(str(path), keep_duplicates=True)
    assert len(examples) == 7 and (report.n_kept, report.n_duplicate_pairs) == (7, 2)
    assert "2 duplicate pairs kept" in report.describe()


def test_limit_takes_the_first_examples_after_dedupe(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", DUPLICATED + ['{"broken'])
    examples, report = load_qa(str(path), limit=4)  # stops before the broken last line
    assert pairs(examples) == [("Q1", "A1"), ("Q2", "A2"), ("Q1", "another answer"), ("Q3", "A3")]
    assert (report.n_rows, report.n_kept, report.n_duplicate_pairs) == (5, 4, 1)
    assert load_qa(str(path), limit=4, keep_duplicates=True)[0][2].question == "Q1"


# --- train/test split -----------------------------------------------------------------------------

def make_examples(n: int) -> list[QAExample]:
    out = []
    for i in range(n):
        q, a = f"Question {i}?", f"Answer {i}."
        out.append(QAExample(stable_hash({"q": q, "a": a}), q, a, f"mem:{i + 1}"))
    return out


def test_split_is_deterministic_and_independent_of_input_order():
    examples = make_examples(200)
    train, test = split_train_test(examples, test_fraction=0.1, seed=0)
    assert len(test) == 20 and len(train) == 180
    assert {ex.key for ex in train} | {ex.key for ex in test} == {ex.key for ex in examples}
    assert not {ex.key for ex in train} & {ex.key for ex in test}
    order = {ex.key: i for i, ex in enumerate(examples)}
    assert [order[ex.key] for ex in test] == sorted(order[ex.key] for ex in test)  # input order kept

    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    train_s, test_s = split_train_test(shuffled, test_fraction=0.1, seed=0)
    assert {ex.key for ex in test_s} == {ex.key for ex in test}
    assert [ex.key for ex in test_s] == [ex.key for ex in shuffled if ex.key in {e.key for e in test}]

    _, other = split_train_test(examples, test_fraction=0.1, seed=1)
    assert {ex.key for ex in other} != {ex.key for ex in test}
    assert split_train_test(examples, test_fraction=0.1, seed=0) == (train, test)


def test_split_fraction_bounds():
    examples = make_examples(10)
    assert split_train_test(examples, test_fraction=0.0) == (examples, [])
    assert len(split_train_test(examples, test_fraction=0.25)[1]) == round(2.5)
    assert len(split_train_test(examples, test_fraction=0.35)[1]) == 4
    assert split_train_test([], test_fraction=0.5) == ([], [])
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            split_train_test(examples, test_fraction=bad)


# --- real data ------------------------------------------------------------------------------------

@pytest.mark.skipif(not MEDQUAD.exists(), reason=f"{MEDQUAD} is not here (../shared beside the repo)")
def test_medquad():
    examples, report = load_qa(str(MEDQUAD), limit=500)
    assert len(examples) == 500 and report.n_kept == 500
    assert examples[0].question == "What is (are) Adult Acute Lymphoblastic Leukemia ?"
    assert examples[0].answer.startswith("Key Points")
    assert examples[0].source == f"{MEDQUAD}:1"
    assert all(ex.question == ex.question.strip() and ex.answer == ex.answer.strip() for ex in examples)
    assert len({ex.key for ex in examples}) == 500
    assert all(len(ex.key) == 16 and int(ex.key, 16) >= 0 for ex in examples)
    train, test = split_train_test(examples, test_fraction=0.1)
    assert (len(train), len(test)) == (450, 50)


def test_demo_source():
    examples, report = load_qa("demo", limit=50)
    assert len(examples) == 50 and examples[0].source == "demo:1"
    assert report.source == "demo" and report.n_duplicate_pairs == 0


def test_alpaca_rows_are_instruction_and_input_to_output(tmp_path):
    from raftune.data import load_qa

    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Add them.", "input": "2 and 3", "output": "5"},
                                {"instruction": "Say hi.", "input": "", "output": "Hi."}]))
    examples, _ = load_qa(str(path))
    assert [(ex.question, ex.answer) for ex in examples] == [("Add them.\n\n2 and 3", "5"), ("Say hi.", "Hi.")]
