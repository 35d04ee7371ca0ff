import json

import pytest

from raftune.files import (
    append_jsonl,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl_log,
    stable_hash,
)


def test_stable_hash_ignores_key_order_and_sees_values():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash("x", 12)) == 12


def test_log_drops_and_repairs_a_cut_off_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"i": 0}, {"i": 1}])
    with open(path, "ab") as f:
        f.write(b'{"i": 2, "text": "cut of')  # what a SIGKILL mid-write leaves
    assert read_jsonl_log(path, repair=False) == [{"i": 0}, {"i": 1}]
    assert path.read_bytes().endswith(b"cut of")  # not repaired when asked not to
    assert read_jsonl_log(path) == [{"i": 0}, {"i": 1}]
    append_jsonl(path, [{"i": 2}])
    assert read_jsonl_log(path) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_log_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(ValueError, match="log.jsonl:2"):
        read_jsonl_log(path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out.jsonl"
    atomic_write_jsonl(path, [{"a": "é"}])
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": "é"}


def test_atomic_write_gives_the_permissions_open_gives(tmp_path):
    """Not mkstemp's private 0600: results are meant to be read by others where the umask allows."""
    import os

    atomic_write_json(tmp_path / "a.json", {})
    with open(tmp_path / "b.json", "w") as f:
        f.write("{}")
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == os.stat(tmp_path / "b.json").st_mode & 0o777
