"""Text generation behind one small interface, used by every stage.

Two backends:
- ``LocalGenerator``: a transformers model in this process, batched across samples with left padding.
- ``OpenAIChatGenerator``: any OpenAI-compatible chat server (vLLM's server, llama.cpp's server,
  Ollama, TGI), with concurrency, time-outs and retries (see ``remote.py``).

A backend is named by a spec string: a model spec (``default``, a local folder, a ``.gguf`` file or a
Hugging Face id) for a local model, or ``http(s)://host:port/v1`` with an optional ``#model-name``
for a server. ``open_generator`` turns a spec into a backend and shares one instance per spec, so the
original model, the fusion model and a judge that are the same model load once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

Messages = list[dict[str, str]]  # one chat: [{"role": "user", "content": "..."}, ...]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"; "error" when a remote call failed after its retries
    error: str | None = None


class Generator(Protocol):
    name: str

    def chat(self, conversations: Sequence[Messages], params: SamplingParams) -> list[Completion]:
        """One completion per conversation, in order."""
        ...


class LocalGenerator:
    """A causal LM in this process; ``chat`` runs the conversations in batches of ``batch_size``."""

    def __init__(self, model, tokenizer, name: str, batch_size: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])

    @torch.inference_mode()
    def chat(self, conversations: Sequence[Messages], params: SamplingParams) -> list[Completion]:
        out: list[Completion] = []
        for start in range(0, len(conversations), self.batch_size):
            out.extend(self._chat_batch(conversations[start : start + self.batch_size], params, start))
        return out

    def _chat_batch(self, conversations: Sequence[Messages], params: SamplingParams, offset: int) -> list[Completion]:
        tok = self.tokenizer
        tok.padding_side = "left"  # generation continues from the right edge of every row
        prefixes = [c[-1]["content"] if c[-1]["role"] == "assistant" else None for c in conversations]
        cont = prefixes[0] is not None  # a reply prefix: continue the assistant turn instead of opening one
        if any((p is not None) != cont for p in prefixes):
            raise ValueError("either every conversation of a call ends with an assistant reply prefix or none does")
        enc = tok.apply_chat_template(
            list(conversations), add_generation_prompt=not cont, continue_final_message=cont, padding=True,
            return_tensors="pt", return_dict=True,
        ).to(self.model.device)
        if params.seed is not None:
            torch.manual_seed(params.seed + offset)  # each batch of a call draws its own, reproducible stream
        sample = params.temperature > 0
        gen = self.model.generate(
            **enc,
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
        )
        new_BT = gen[:, enc["input_ids"].shape[1] :].cpu()  # (B, T_new)
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, n_prompt, prefix in zip(new_BT.tolist(), prompt_lens, prefixes):
            n, reason = len(row), "length"
            for i, t in enumerate(row):
                if t in self.eos_ids:
                    n, reason = i, "stop"
                    break
            text = tok.decode(row[:n], skip_special_tokens=True)
            text = (prefix + text if prefix else text).strip()
            results.append(Completion(text, int(n_prompt), n, reason))
        return results


_OPEN: dict[tuple, Generator] = {}


def is_remote_spec(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def open_generator(
    spec: str,
    *,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str | None = None,
    api_key_env: str = "RAFTUNE_API_KEY",
    concurrency: int = 8,
    timeout_s: float = 120.0,
    max_retries: int = 4,
) -> Generator:
    """The backend for ``spec``; the same spec (and settings) returns the same instance."""
    key = (spec, batch_size, device, dtype, api_key_env, concurrency, timeout_s, max_retries)
    if key in _OPEN:
        return _OPEN[key]
    if is_remote_spec(spec):
        from raftune.remote import OpenAIChatGenerator

        url, _, model = spec.partition("#")
        gen: Generator = OpenAIChatGenerator(
            url, model=model or None, api_key_env=api_key_env, concurrency=concurrency,
            timeout_s=timeout_s, max_retries=max_retries,
        )
    else:
        from raftune.models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(spec, device=device, dtype=dtype)
        gen = LocalGenerator(model, tok, name=spec, batch_size=batch_size)
    _OPEN[key] = gen
    return gen



class CompletionLog:
    """Completions logged to a JSONL file as they are made, keyed by backend, conversation and settings;
    one log may serve several generators (a model and its judges). ``also`` are other runs' logs,
    read but never written: their completions are served too (an evaluation reuses the base model's
    answers that the base model's own evaluation made)."""

    def __init__(self, path, also=()):
        from pathlib import Path

        from raftune.files import read_jsonl_log

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries = {}
        for source in [*also, self.path]:
            rows = read_jsonl_log(source, repair=Path(source) == self.path)
            self.entries.update({r["key"]: Completion(**r["completion"]) for r in rows})

    def add(self, entries: dict[str, Completion]) -> None:
        from dataclasses import asdict

        from raftune.files import append_jsonl

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

    def __init__(self, inner: Generator, log: CompletionLog):
        self.inner = inner
        self.log = log
        self.hits = 0

    def __getattr__(self, name):  # only called for what this class does not define
        return getattr(self.inner, name)

    def chat(self, conversations: Sequence[Messages], params: SamplingParams) -> list[Completion]:
        from dataclasses import asdict

        from raftune.files import stable_hash

        keys = [stable_hash([self.inner.name, c, asdict(params)], 24) for c in conversations]
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
