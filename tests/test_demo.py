"""The built-in demo domain: enough pairs, unique, reproducible, within the length bounds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raftune.data import load_qa
from raftune.demo import MAX_CHARS, MIN_CHARS, build_demo, first_paragraph, write_demo


@pytest.fixture(scope="module")
def demo() -> list[dict]:
    return build_demo()


def test_enough_unique_pairs(demo):
    assert len(demo) >= 1000
    assert all(set(r) == {"question", "answer", "id", "module", "name"} for r in demo)
    assert len({r["id"] for r in demo}) == len(demo)
    assert len({r["question"] for r in demo}) == len(demo)
    assert all(r["id"] == f"{r['module']}.{r['name']}" for r in demo)
    assert len({r["module"] for r in demo}) >= 30


def test_keys_unique_through_the_loader():
    examples, report = load_qa("demo")
    assert report.n_duplicate_pairs == 0 and report.n_duplicate_questions == 0
    assert len({ex.key for ex in examples}) == len(examples) >= 1000


def test_known_pair(demo):
    by_id = {r["id"]: r for r in demo}
    median = by_id["statistics.median_grouped"]
    assert "`statistics.median_grouped`" in median["question"]
    assert median["answer"].startswith("`statistics.median_grouped(data, interval=")
    assert "median" in median["answer"]
    dedent = by_id["textwrap.dedent"]
    assert dedent["answer"].startswith("`textwrap.dedent(text)`: Remove any common leading whitespace")
    assert "pathlib.PurePath.with_suffix" in by_id  # a method, without self in its signature
    assert by_id["pathlib.PurePath.with_suffix"]["answer"].startswith(
        "`pathlib.PurePath.with_suffix(suffix)`: ")


def test_answers_within_bounds(demo):
    for r in demo:
        prefix = f"`{r['id']}"
        assert r["answer"].startswith(prefix), r
        doc = r["answer"].split("`: ", 1)[1]
        assert MIN_CHARS <= len(doc) <= MAX_CHARS, r
        assert doc == " ".join(doc.split()), r  # whitespace-normalised
        assert " at 0x" not in r["answer"], r


def test_reproducible_whatever_was_imported_and_hash_seed(demo):
    # Another process with another hash seed, which has imported a library that patches the
    # standard library (torch replaces inspect.getfile), gives the same pairs.
    code = ("import json, sys, logging\n"
            "def added(self):\n    'A method that a third-party library added to the standard class.'\n"
            "logging.Logger.added = added\n"
            "from raftune.demo import build_demo; json.dump(build_demo(), sys.stdout)")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == demo
    assert build_demo() == demo


def test_write_demo(tmp_path, demo):
    n = write_demo(tmp_path / "demo.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "demo.jsonl").read_text().splitlines()]
    assert n == len(rows) == len(demo) and rows == demo


def test_first_paragraph():
    assert first_paragraph("log(x, [base=math.e])\nReturn the logarithm of x.\n\nMore.") == \
        "Return the logarithm of x."
    assert first_paragraph("Point(x, y)") is None
    assert first_paragraph("  Spread\n    over   lines.\n\n  Second.") == "Spread over lines."
    assert first_paragraph("S.remove(value) -- remove first occurrence of value.") == \
        "remove first occurrence of value."
    assert first_paragraph(None) is None and first_paragraph("") is None
