"""Completions logged as they are made, so that a stopped stage resumes where it was."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from raftune.files import append_jsonl, read_jsonl_log, stable_hash
from raftune.generation.base import Completion, Generator, Messages, SamplingParams


class CompletionLog:
    """Completions logged to a JSONL file as they are made, keyed by the backend's content, conversation and settings;
    one log may serve several generators (a model and its judges). ``also`` are other runs' logs,
    read but never written: their completions are served too (an evaluation reuses the base model's
    answers that the base model's own evaluation made)."""

    def __init__(self, path, also=()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries = {}
        for source in [*also, self.path]:
            rows = read_jsonl_log(source, repair=Path(source) == self.path)
            self.entries.update({r["key"]: Completion(**r["completion"]) for r in rows})

    def add(self, entries: dict[str, Completion]) -> None:
        append_jsonl(self.path, [{"key": k, "completion": asdict(c)} for k, c in entries.items()])
        self.entries.update(entries)


class CachedGenerator:
    """A generator whose completions go to a ``CompletionLog`` and are served from it when asked
    again: a run that stops resumes where it was, losing at most the batch in flight.

    The misses of a call go to the backend in its own batch size (64 at a time for a server) and are
    logged after every batch. Failed remote calls are not logged, so a rerun asks again. Sampled
    requests served from the log keep the values first drawn. Attributes other than ``chat`` (the
    local model and tokenizer, the batch size, the name) are the backend's.
    """

    def __init__(self, inner: Generator, log: CompletionLog, identity: str | None = None):
        self.inner = inner
        self.log = log
        # what the backend is, for the log's keys: its content (``outputs.model_fingerprint``), so a model
        # replaced at the same path is never served the old one's answers; its name where none is given
        self.identity = identity or inner.name
        self.hits = 0

    def __getattr__(self, name):  # only called for what this class does not define
        return getattr(self.inner, name)

    def chat(self, conversations: Sequence[Messages], params: SamplingParams) -> list[Completion]:
        keys = [stable_hash([self.identity, c, asdict(params)], 24) for c in conversations]
        out = [self.log.entries.get(k) for k in keys]
        todo = [i for i, c in enumerate(out) if c is None]
        self.hits += len(keys) - len(todo)
        step = getattr(self.inner, "batch_size", None) or 64
        for s in range(0, len(todo), step):
            idx = todo[s : s + step]
            for i, c in zip(idx, self.inner.chat([conversations[i] for i in idx], params)):
                out[i] = c
            self.log.add({keys[i]: out[i] for i in idx if out[i].error is None})
        return out
