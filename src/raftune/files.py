"""File primitives every stage relies on: atomic writes, crash-tolerant JSONL logs, content hashes."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


def _read_umask() -> int:  # os.umask can only be read by setting it: once, at import, before any threads
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old content or all of the new, never a part.
    The file gets the permissions ``open`` would give it (mkstemp's temporary file is private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append rows with one write and fsync them: after a crash the file ends in whole lines plus at
    most one partial line, which ``read_jsonl_log`` drops."""
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_log(path: str | Path, repair: bool = True) -> list[dict]:
    """Rows of an append-only log. A last line without its newline is the trace of a write cut off by
    a crash: it is dropped (and cut from the file when ``repair``), so the next append starts clean."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for i, line in enumerate(raw[:end].splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: corrupt log line ({e.msg}); the file was edited by hand?") from e
    return rows
