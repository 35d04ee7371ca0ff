"""What raftune writes, and when it may use it again.

Every output folder raftune makes (a refine, train or eval run, a post-hoc model, a comparison) holds
a manifest, ``raftune-output.json``: the kind of output, the key of what made it (a hash of the
settings and of the content of the models and data read), and whether it is complete. Three rules
follow from it, each written once here:

- **claim**: a command writes only into a folder that does not exist yet (it creates it, manifest
  first), an empty folder, or one whose manifest says it holds output of the same kind. Anything
  else (a user's folder, a training run given as the output of ``fapm``, a model folder) is refused
  with an ``OutputError`` naming the folder and what it holds.
- **key**: output of the same kind but another key is never silently taken: the caller says whether
  it is refused (a training run's checkpoints) or made again (an evaluation, a post-hoc model).
- **lock**: one process at a time writes a run folder (``flock`` on its ``.lock``, released when the
  process dies, SIGKILL included); a second one is refused at once, naming the first one's pid.

Models are keyed by content, not path: ``model_fingerprint`` hashes the files of a model folder
(sha256), remembering each file's hash by (size, mtime, inode) in the raftune cache, so a model is read
once per version, however often it is evaluated.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from raftune.files import atomic_write_json, stable_hash

log = logging.getLogger("raftune.outputs")

MANIFEST = "raftune-output.json"
LOCK = ".lock"
FORMAT = 1


class OutputError(ValueError):
    """An output folder that raftune may not write, or output that may not be reused."""


@dataclass(frozen=True)
class Claim:
    path: Path
    kind: str
    key: str
    previous_key: str | None  # the key of the output the folder held before; None: a new folder
    complete: bool  # the folder already holds a complete output of this kind and key

    @property
    def same(self) -> bool:
        return self.previous_key == self.key


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a raftune output folder; None where there is none (or it is not one raftune wrote)."""
    path = Path(folder) / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str) or not isinstance(raw.get("key"), str):
        return None
    return raw


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _contents(folder: Path, n: int = 4) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _short(value) -> str:
    text = json.dumps(value, default=str)
    if isinstance(value, str) and value.startswith(("folder:", "file:")):
        text = value.split(":")[0] + " content " + value.split(":")[1][:8]
    return text if len(text) <= 40 else text[:37] + "..."


def differences(old: dict | None, new: dict | None, n: int = 6) -> str:
    """What differs between two ``made_of`` records, for a message: 'max_steps 2 -> 3, models [...] -> [...]'."""
    if not old or not new:
        return ""
    a, b = _flat(old), _flat(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    shown = [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in keys[:n]]
    return ", ".join(shown) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def claim(folder: str | Path, kind: str, key: str, *, other_key: Literal["refuse", "redo"], what: str = "",
          hint: str = "", create: bool = True, made_of: dict | None = None) -> Claim:
    """Take ``folder`` for an output of ``kind`` made from ``key`` (see the module docstring).

    ``other_key``: what a folder holding this kind of output with another key gets: ``refuse`` raises
    ``OutputError``; ``redo`` claims it anew (the caller makes its output again). ``what`` describes the
    key's inputs for the messages ("method sft, lr 2e-4"); ``made_of`` (what the key hashes, kept in the
    manifest) lets a refusal say what differs; ``hint`` is added to a refusal. ``create=False`` only
    checks: for an output written whole under another name and renamed into place (a model folder)."""
    folder = Path(folder)
    hint = f"; {hint}" if hint else ""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file, not a folder; give a folder for the {kind} output")
    previous = None
    if folder.is_dir():
        manifest = read_manifest(folder)
        if manifest is None:
            if any(p.name != LOCK for p in folder.iterdir()):
                raise OutputError(f"{folder}: exists and holds files raftune did not write as output ({_contents(folder)}); "
                                  f"it is left as it is: give a new folder for the {kind} output")
        elif manifest["kind"] != kind:
            raise OutputError(f"{folder}: holds a raftune {manifest['kind']} output, not {_a(kind)} one; it is left as it is: "
                              f"give another folder{hint}")
        else:
            previous = manifest["key"]
            if previous != key and other_key == "refuse":
                diff = differences(manifest.get("made_of"), made_of)
                said = f" ({diff})" if diff else f" ({manifest['what']})" if manifest.get("what") else ""
                raise OutputError(f"{folder}: holds {_a(kind)} output of other settings or inputs{said}; it is left as it "
                                  f"is{hint}")
            if previous == key:
                return Claim(folder, kind, key, previous, bool(manifest.get("complete")))
    if not create:
        return Claim(folder, kind, key, previous, False)
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, kind, key, what, complete=False, **({"made_of": made_of} if made_of is not None else {}))
    if previous is not None:
        log.warning("%s held %s output of other settings or inputs; it is made again%s", folder, _a(kind),
                    f" ({what})" if what else "")
    return Claim(folder, kind, key, previous, False)


def write_manifest(folder: Path, kind: str, key: str, what: str = "", complete: bool = False, **extra) -> None:
    atomic_write_json(Path(folder) / MANIFEST, {"format": FORMAT, "kind": kind, "key": key, "what": what,
                                                "complete": complete, **extra})


def mark_complete(folder: Path) -> None:
    manifest = read_manifest(folder)
    if manifest is None:
        raise OutputError(f"{folder}: has no {MANIFEST}; it was not claimed")
    atomic_write_json(Path(folder) / MANIFEST, {**manifest, "complete": True})


@contextlib.contextmanager
def locked(folder: str | Path, what: str = "") -> Iterator[None]:
    """Hold ``folder``'s lock for the block: a second process writing the same folder is refused at once."""
    path = Path(folder) / LOCK
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the process dies, even by SIGKILL
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            fh.seek(0)
            pid = fh.read().strip() or "?"
            raise OutputError(f"{folder}: another raftune process (pid {pid}) is writing it{f' ({what})' if what else ''}; "
                              "wait for it to end, or stop it, then run the same command again") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()


# --- model content ---------------------------------------------------------------------------------

_SKIP = {MANIFEST, LOCK}


def _file_sha256(path: Path, memo: dict) -> str:
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    hit = memo.get(str(path))
    if hit and hit[0] == stamp:
        return hit[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    memo[str(path)] = [stamp, h.hexdigest()]
    return h.hexdigest()


@contextlib.contextmanager
def _memo() -> Iterator[dict]:
    """The per-file hashes remembered in the raftune cache, saved back after the block (entries of files
    that are gone dropped); a cache that cannot be read or written costs time, not correctness."""
    from raftune.models import cache_dir

    path = cache_dir() / "fingerprints.json"
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    yield memo
    with contextlib.suppress(OSError):
        atomic_write_json(path, {k: v for k, v in memo.items() if os.path.exists(k)})


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 over the names and contents of the files of ``folder`` (recursively; hidden files and
    raftune's manifest and lock left out: they say who wrote the folder, not what it holds)."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in _SKIP
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    with _memo() as memo:
        return stable_hash([[str(p.relative_to(folder)), _file_sha256(p, memo)] for p in files], 32)


def _file_fingerprint(path: Path) -> str:
    with _memo() as memo:
        return _file_sha256(path.resolve(), memo)[:32]


def model_fingerprint(spec: str | None) -> str | None:
    """What ``spec`` holds: the content hash of its files for a local model (``default``, a folder, a
    .gguf, a hub id found in the local hub cache); the spec itself for a server or a hub id not cached
    (nothing local to hash); None for None."""
    if spec is None:
        return None
    from raftune.generation import is_remote_spec, public_spec
    from raftune.models import check_model

    if is_remote_spec(spec):
        return f"server:{public_spec(spec)}"
    # a damaged local model is refused here: every stage keys its folder by this, before it makes it
    path = check_model(spec) or Path(spec).expanduser()
    if path.is_file():
        return f"file:{_file_fingerprint(path)}"
    if path.is_dir():
        return f"folder:{folder_fingerprint(path)}"
    try:
        from huggingface_hub import snapshot_download

        return f"folder:{folder_fingerprint(snapshot_download(spec, local_files_only=True))}"
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): loading it will say what is wrong
        return f"hub:{spec}"


def data_fingerprint(spec: str | None) -> str | None:
    """What a data source holds: the content hash of a file or a folder (``save_to_disk``); the spec
    itself for ``demo`` (made from the running Python, named by its version) or a hub id."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return f"file:{_file_fingerprint(path)}"
    if path.is_dir():
        return f"folder:{folder_fingerprint(path)}"
    if spec == "demo":
        import sys

        return f"demo:{sys.version_info[0]}.{sys.version_info[1]}"
    return f"id:{spec}"
