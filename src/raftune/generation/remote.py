"""The remote generation backend: any OpenAI-compatible chat server (vLLM, llama.cpp, Ollama, TGI).

``OpenAIChatGenerator.chat`` sends one ``POST {url}/chat/completions`` per conversation, up to
``concurrency`` at a time from a thread pool (the callers are synchronous). A request that fails on
a connection error, a time-out, HTTP 429 or 5xx, or that is answered 2xx with something that is not
a chat completion (not JSON, an HTML page, JSON without ``choices[0].message.content`` as a string;
``null`` passes only with ``finish_reason: length``, an empty answer at the limit), is retried with exponential back-off and jitter (at least the server's ``Retry-After``); other 4xx
answers mean the request itself is wrong, so the call raises ``RemoteError`` with the server's
message. A request still failing after its retries becomes ``Completion(text="",
finish_reason="error", error=...)`` so one bad request does not sink a batch: it is a failure, never
an answer, and the stages treat it so (``refine`` records no sample with a failed generation,
``eval`` scores no failed answer; both finish the rest, then raise ``GenerationFailed``, and a rerun
asks exactly the failed requests again). When no request of a call gets through because the server
cannot be reached, the call raises (and stops sending once a request has used up its retries on
connection errors before any other succeeded, rather than waiting out the retries of the whole
batch).

The API key is read from the environment variable named by ``api_key_env`` and sent as a bearer
token; it is kept out of ``repr``, log lines and error messages.
"""
from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import httpx

from raftune.generation.base import Completion, Messages, SamplingParams

log = logging.getLogger("raftune.remote")

MAX_RETRY_AFTER_S = 300.0  # a server asking for a longer pause is treated as asking for this one


class RemoteError(RuntimeError):
    """The server refused a request (4xx other than 429), answered nonsense, or cannot be reached."""


@dataclass(frozen=True)
class _Failure:
    """Why one request gave up after its retries; ``connection`` when it never reached the server."""

    message: str
    connection: bool


_NOT_SENT = _Failure("not sent: the server looked unreachable", connection=True)


class OpenAIChatGenerator:
    """A ``Generator`` over ``{url}/chat/completions``; ``url`` is the API base, e.g. ``http://host:8000/v1``.

    ``model=None`` asks ``{url}/models`` once, at construction, and uses the first model listed.
    Each request is tried at most ``1 + max_retries`` times; waits grow as ``backoff_s * 2**k``
    (capped at ``max_backoff_s``) times a random factor in [0.5, 1.5) so that clients retrying
    together do not hit the server in lock step.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key_env: str | None = "RAFTUNE_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_s < 0 or max_backoff_s < 0:
            raise ValueError(f"backoff_s and max_backoff_s must be >= 0, got {backoff_s}, {max_backoff_s}")
        self.url = url.rstrip("/")
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.model = model if model else self._discover_model()
        self.name = f"{self.url}#{self.model}"

    def __repr__(self) -> str:
        key = f"${self.api_key_env}" if self._api_key else "none"
        return (
            f"OpenAIChatGenerator(url={self.url!r}, model={self.model!r}, api_key={key}, "
            f"concurrency={self.concurrency}, timeout_s={self.timeout_s}, max_retries={self.max_retries})"
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIChatGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the Generator interface ---------------------------------------------------------------

    def chat(self, conversations: Sequence[Messages], params: SamplingParams) -> list[Completion]:
        """One completion per conversation, in order; see the module docstring for failures."""
        n = len(conversations)
        if n == 0:
            return []
        results: list[Completion | _Failure | None] = [None] * n
        any_ok = threading.Event()
        stop = threading.Event()  # the server looks down, or refused a request: send no more
        fatal: list[RemoteError] = []

        def one(i: int) -> None:
            if stop.is_set():
                results[i] = _NOT_SENT
                return
            try:
                answer = self._request("POST", "/chat/completions", self._body(conversations[i], params, i),
                                       parse=_parse_completion)
            except RemoteError as e:
                fatal.append(e)
                stop.set()
                return
            results[i] = answer
            if isinstance(answer, _Failure):
                if answer.connection and not any_ok.is_set():
                    stop.set()  # nothing got through yet: don't wait out the retries of every other request
                return
            any_ok.set()

        with ThreadPoolExecutor(max_workers=min(self.concurrency, n), thread_name_prefix="raftune-remote") as pool:
            for f in [pool.submit(one, i) for i in range(n)]:
                f.result()  # re-raises a bug in ``one``; expected failures are in ``results`` and ``fatal``
        if fatal:
            raise fatal[0]
        if all(isinstance(r, _Failure) and r.connection for r in results):
            first = next(r for r in results if r is not _NOT_SENT)
            raise RemoteError(f"the server at {self.url} is unreachable: {first.message}")  # type: ignore[union-attr]
        return [r if isinstance(r, Completion) else _error_completion(r) for r in results]  # type: ignore[arg-type]

    # --- requests ------------------------------------------------------------------------------

    def _body(self, messages: Messages, params: SamplingParams, index: int) -> dict[str, Any]:
        if messages and messages[-1]["role"] == "assistant":
            # A reply prefix (templates.PromptTemplate.reply_prefix) is a local-backend nicety: chat
            # servers do not agree on how to continue an assistant turn, so it is left out here and
            # the prompt's own instruction asks for the format.
            messages = messages[:-1]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed + index  # requests of one batch differ, and a rerun repeats them
        return body

    def _discover_model(self) -> str:
        answer = self._request("GET", "/models")
        if isinstance(answer, _Failure):
            if answer.connection:
                raise RemoteError(f"the server at {self.url} is unreachable: {answer.message}")
            raise RemoteError(f"could not list the models of {self.url}: {answer.message}")
        try:
            ids = [m["id"] for m in answer.json()["data"]]
        except (ValueError, KeyError, TypeError) as e:
            raise RemoteError(f"{self.url}/models answered something that is not a model list: {e!r}") from None
        if not ids:
            raise RemoteError(f"{self.url}/models lists no models; pass one as {self.url}#MODEL")
        return ids[0]

    def _request(self, method: str, path: str, body: dict | None = None, parse: Callable | None = None) -> Any:
        """The 2xx answer (``parse(answer)`` when ``parse`` is given), or why the last of ``1 + max_retries``
        attempts failed. A 2xx answer that ``parse`` rejects (``ValueError``) is retried like a 5xx:
        a proxy's HTML page or a server's error in a 200 is no answer.

        Raises ``RemoteError`` at once on a 4xx answer other than 429: sending it again won't help.
        """
        url = self.url + path
        attempts = 1 + self.max_retries
        for attempt in range(1, attempts + 1):
            retry_after = None
            try:
                r = self._client.request(method, url, json=body)
            except httpx.ConnectError as e:
                failure = _Failure(self._redact(f"cannot connect to {url}: {e}"), connection=True)
            except httpx.ConnectTimeout:
                failure = _Failure(f"connecting to {url} timed out after {self.timeout_s:g}s", connection=True)
            except httpx.TimeoutException:
                failure = _Failure(f"{method} {url} timed out after {self.timeout_s:g}s", connection=False)
            except httpx.TransportError as e:  # the connection dropped mid-request, a protocol error, ...
                failure = _Failure(self._redact(f"{method} {url} failed: {e!r}"), connection=False)
            else:
                if not r.is_success:
                    failure = self._http_failure(method, url, r)
                    retry_after = _retry_after_s(r.headers.get("Retry-After"))
                elif parse is None:
                    return r
                else:
                    try:
                        return parse(r)
                    except ValueError as e:
                        failure = _Failure(self._redact(f"{method} {url} answered HTTP {r.status_code} with no chat "
                                                        f"completion ({e}): {_start(r.text)}"), connection=False)
            if attempt == attempts:
                return failure
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            if retry_after is not None:
                delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
            log.warning("attempt %d/%d: %s; retrying in %.2fs", attempt, attempts, failure.message, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _http_failure(self, method: str, url: str, r: httpx.Response) -> _Failure:
        """A 429 or 5xx answer as a retryable failure; raises ``RemoteError`` on any other 4xx."""
        message = self._redact(f"{method} {url} answered HTTP {r.status_code}: {_server_message(r)}")
        if r.status_code != 429 and r.status_code < 500:
            raise RemoteError(message)
        return _Failure(message, connection=False)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def _error_completion(failure: _Failure) -> Completion:
    return Completion(text="", prompt_tokens=0, completion_tokens=0, finish_reason="error", error=failure.message)


def _parse_completion(r: httpx.Response) -> Completion:
    """The completion in a chat completion body; ``ValueError`` saying what is missing when it is none.

    ``choices[0].message.content`` must be a string. ``null`` is accepted only with ``finish_reason``
    ``length``: a model that spent its whole budget before answering (a reasoning model still thinking)
    gave an empty answer, which asking again would not change.
    """
    try:
        data = r.json()
    except ValueError:
        raise ValueError("the body is not JSON") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("no choices")
    choice = choices[0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    reason = "length" if choice.get("finish_reason") == "length" else "stop"
    if text is None and reason == "length" and isinstance(message, dict):
        text = ""
    if not isinstance(text, str):
        raise ValueError("choices[0].message.content is not a string")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return Completion(text=text.strip(), prompt_tokens=_count(usage.get("prompt_tokens")),
                      completion_tokens=_count(usage.get("completion_tokens")), finish_reason=reason)


def _count(value) -> int:
    """A token count from ``usage``; 0 when absent or not a number (bookkeeping, not worth a retry)."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def _start(text: str, n: int = 200) -> str:
    """The start of a body, on one line, for an error message."""
    text = " ".join(text.split())
    return (text[:n] + "...") if len(text) > n else (text or "(empty body)")


def _server_message(r: httpx.Response) -> str:
    """The error message of an OpenAI-style error body, or the start of whatever the server sent."""
    try:
        data = r.json()
    except ValueError:
        return r.text[:500].strip() or r.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:500]
        if err is not None:
            return str(err)[:500]
    return str(data)[:500]


def _retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())
