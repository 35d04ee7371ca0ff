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

A server URL may carry credentials (``http://user:secret@host/v1#model``, sent as HTTP basic auth):
``public_spec`` is the form written wherever a spec is recorded (run folders, logs, messages, run
hashes), with the credentials masked. A server's API key comes from the environment variable named
by ``api_key_env`` (``server_api_key``).
"""
from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from raftune.generation.base import (
    Completion,
    GenerationFailed,
    Generator,
    Messages,
    SamplingParams,
)
from raftune.generation.local import LocalGenerator
from raftune.generation.log import CachedGenerator, CompletionLog

__all__ = ["DEFAULT_API_KEY_ENV", "CachedGenerator", "Completion", "CompletionLog", "GenerationFailed", "Generator",
           "LocalGenerator", "Messages", "SamplingParams", "is_remote_spec", "open_generator", "public_spec", "public_specs",
           "server_api_key"]

_OPEN: dict[tuple, Generator] = {}

DEFAULT_API_KEY_ENV = "RAFTUNE_API_KEY"


def is_remote_spec(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def public_spec(spec: str) -> str:
    """``spec`` as it may be written to a file or shown: a server URL's password masked
    (``http://user:***@host/v1#model``), or its whole user part when it has no password (it may be a
    token). Anything else is returned as it is."""
    if not is_remote_spec(spec):
        return spec
    parts = urlsplit(spec)
    if "@" not in parts.netloc:
        return spec
    userinfo, host = parts.netloc.rsplit("@", 1)  # a password may hold an unescaped "@"; a host never does
    user, colon, _ = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if colon else f"***@{host}"))


def public_specs(values: dict) -> dict:
    """``values`` (a config's settings) with every string among them, or in a list of them, in its
    ``public_spec`` form: what a run folder records and what its hash covers (so not the password)."""
    def public(v):
        if isinstance(v, str):
            return public_spec(v)
        if isinstance(v, (list, tuple)):
            return type(v)(public(x) for x in v)
        return v

    return {k: public(v) for k, v in values.items()}


def server_api_key(api_key_env: str | None) -> str:
    """The API key in the environment variable ``api_key_env`` ("" for none). The default variable
    left unset means a server without a key; a variable the user named that is unset (or empty) is
    an error, raised before any request (sending none would only be refused by the server, once the
    stage had started)."""
    if not api_key_env:
        return ""
    key = os.environ.get(api_key_env, "")
    if not key and api_key_env != DEFAULT_API_KEY_ENV:
        raise ValueError(f"the environment variable {api_key_env} is not set (it should hold the servers' "
                         f"API key); set it, or leave api_key_env at its default {DEFAULT_API_KEY_ENV} for servers "
                         f"without a key")
    return key


def open_generator(
    spec: str,
    *,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str | None = None,
    api_key_env: str = DEFAULT_API_KEY_ENV,
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
    for stale in [k for k in _OPEN if k[0] == spec and k[1] != key[1]]:  # the old content's weights: freed
        del _OPEN[stale]
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
