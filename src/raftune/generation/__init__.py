"""Text generation behind one interface, used by every stage.

    gen = open_generator("default")                                # or a folder, a .gguf, a hub id, a server
    gen.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=64))

The package, one module per piece:
- ``base``: the interface (``Generator.chat``, ``SamplingParams``, ``Completion``), and
  ``GenerationFailed``, what a stage raises when some generations failed after their retries;
- ``local``: ``LocalGenerator``, a transformers model in this process, decoding through
- ``engine``: the ``DecodeEngine``, the one decoding path of raftune (also the student's rollouts);
- ``remote``: ``OpenAIChatGenerator``, any OpenAI-compatible chat server (vLLM, llama.cpp, Ollama,
  TGI), with concurrency, time-outs and retries;
- ``log``: ``CompletionLog`` and ``CachedGenerator``, completions logged as made, for resuming.

A backend is named by a spec string: a model spec (``default``, a local folder, a ``.gguf`` file or a
Hugging Face id) for a local model, or ``http(s)://host:port/v1`` with an optional ``#model-name``
for a server. ``open_generator`` turns a spec into a backend and shares one instance per spec, so the
original model, the fusion model and a judge that are the same model load once.
"""
from __future__ import annotations

from raftune.generation.base import (
    Completion,
    GenerationFailed,
    Generator,
    Messages,
    SamplingParams,
)
from raftune.generation.local import LocalGenerator
from raftune.generation.log import CachedGenerator, CompletionLog

__all__ = ["CachedGenerator", "Completion", "CompletionLog", "GenerationFailed", "Generator", "LocalGenerator", "Messages",
           "SamplingParams", "is_remote_spec", "open_generator"]

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
    compile: str = "auto",
) -> Generator:
    """The backend for ``spec``; the same spec (and settings) returns the same instance."""
    from raftune.outputs import model_fingerprint

    # by content too: a model replaced at the same path (a post-hoc model made again) is loaded again
    key = (spec, model_fingerprint(spec), batch_size, device, dtype, api_key_env, concurrency, timeout_s, max_retries, compile)
    if key in _OPEN:
        return _OPEN[key]
    if is_remote_spec(spec):
        from raftune.generation.remote import (
            OpenAIChatGenerator,  # httpx only where a server is used
        )

        url, _, model = spec.partition("#")
        gen: Generator = OpenAIChatGenerator(
            url, model=model or None, api_key_env=api_key_env, concurrency=concurrency,
            timeout_s=timeout_s, max_retries=max_retries,
        )
    else:
        from raftune.models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(spec, device=device, dtype=dtype)
        gen = LocalGenerator(model, tok, name=spec, batch_size=batch_size, compile=compile)
    _OPEN[key] = gen
    return gen
