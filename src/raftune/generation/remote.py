"""The remote generation backend: any OpenAI-compatible chat server (vLLM, llama.cpp, Ollama, TGI).

``OpenAIChatGenerator.chat`` sends one ``POST {url}/chat/completions`` per conversation, up to
``concurrency`` at a time from daemon threads (the callers are synchronous). A request that fails on
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

``timeout_s`` bounds a whole attempt: connecting, sending and every read of the answer share one
deadline (each socket operation waits at most the time left), so a server that trickles its answer a
byte at a time fails the attempt at ``timeout_s`` like one that never answers. The answer is read as
a stream and never held whole beyond what ``max_tokens`` can justify: a body over
``BODY_BYTES + max_tokens * BODY_BYTES_PER_TOKEN`` bytes is not read further and fails the attempt
(retried like a 5xx); a reply text over ``max_tokens * MAX_CHARS_PER_TOKEN`` characters, or one whose
``usage.completion_tokens`` shows the server went well past ``max_tokens``, is cut to what the limit
allows, ``Completion.cut`` and counted in ``cut_replies`` (the stages report it: ``summary.json``,
``results.json``), with ``finish_reason: length``.

Requests run in daemon threads: a Ctrl-C (any exception) in the calling thread returns at once, sends
nothing more and leaves the requests in flight to end with their deadline or with the process; the
call's completions are lost, never half recorded.

The API key is read from the environment variable named by ``api_key_env`` (``server_api_key``: the
default variable unset means no key, another one unset is an error) and sent as a bearer token.
Credentials in the URL (``http://user:secret@host/v1``) are sent as HTTP basic auth instead.
Neither is ever in ``repr``, ``name``, ``url``, log lines or error messages (``public_spec``).
"""
from __future__ import annotations

import dataclasses
import email.utils
import functools
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

import httpcore
import httpx

from raftune.generation import DEFAULT_API_KEY_ENV, public_spec, server_api_key
from raftune.generation.base import Completion, Messages, SamplingParams

log = logging.getLogger("raftune.remote")

MAX_RETRY_AFTER_S = 300.0  # a server asking for a longer pause is treated as asking for this one
# The caps of an answer. Tokens of real tokenizers are a few characters (English ~4; merged runs of
# spaces or symbols in code are longer, rarely past 16): 32 per token is generous, and text beyond it
# is no answer within max_tokens. A body also holds JSON escapes (6 bytes for a non-ASCII character),
# usage and perhaps logprobs: 1 MiB plus 256 bytes per token bounds it without cutting any real one.
MAX_CHARS_PER_TOKEN = 32
BODY_BYTES = 1 << 20
BODY_BYTES_PER_TOKEN = 256
MODELS_BODY_BYTES = 16 << 20  # GET /models of a hosted API lists hundreds of models


class RemoteError(RuntimeError):
    """The server refused a request (4xx other than 429), answered nonsense, or cannot be reached."""


# --- the whole-request deadline ---------------------------------------------------------------------------
# httpx's time-outs bound each socket operation, so bytes that keep trickling in (even into the status
# line and headers, which httpcore reads before returning a response) keep a request alive forever. The
# deadline of the request a thread is making is kept here, and every connect, write and read of its
# connection waits at most the time left. Requests are synchronous, so the thread that makes a request
# is the one that reads its socket.
_DEADLINE = threading.local()


def _time_left(timeout: float | None, expired: type[Exception]) -> float | None:
    at = getattr(_DEADLINE, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _time_left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _time_left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend):
        self._inner = inner

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _DeadlineStream(self._inner.connect_tcp(host, port, _time_left(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _DeadlineStream(self._inner.connect_unix_socket(path, _time_left(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _deadline_client(**kwargs) -> httpx.Client:
    """An ``httpx.Client`` whose connections (direct, or through the proxies of the environment) honour
    ``_DEADLINE``. httpx does not take a network backend, so it goes into the connection pools it made;
    a version of httpx without them fails here, at construction, rather than leaving requests unbounded."""
    client = httpx.Client(**kwargs)
    for transport in [client._transport, *(t for t in client._mounts.values() if t is not None)]:
        pool = getattr(transport, "_pool", None)
        if not isinstance(getattr(pool, "_network_backend", None), httpcore.NetworkBackend):
            client.close()
            raise RuntimeError(f"httpx {httpx.__version__}: cannot bound requests by a deadline (no connection pool "
                               f"with a network backend in {type(transport).__name__}); install httpx 0.27 or 0.28")
        pool._network_backend = _DeadlineBackend(pool._network_backend)
    return client


class _TooLarge(Exception):
    pass


@dataclass(frozen=True)
class _Failure:
    """Why one request gave up after its retries; ``connection`` when it never reached the server."""

    message: str
    connection: bool


_NOT_SENT = _Failure("not sent: the server looked unreachable", connection=True)


class OpenAIChatGenerator:
    """A ``Generator`` over ``{url}/chat/completions``; ``url`` is the API base, e.g. ``http://host:8000/v1``.

    ``model=None`` asks ``{url}/models`` once, at construction, and uses the first model listed.
    Each request is tried at most ``1 + max_retries`` times, each attempt within ``timeout_s``; waits
    grow as ``backoff_s * 2**k`` (capped at ``max_backoff_s``) times a random factor in [0.5, 1.5) so
    that clients retrying together do not hit the server in lock step. ``url`` and ``name`` are the
    public forms (credentials masked); ``cut_replies`` counts the replies cut so far.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key_env: str | None = DEFAULT_API_KEY_ENV,
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
        url = url.rstrip("/")
        self.url = public_spec(url)
        parts = urlsplit(url)
        user = password = None
        if "@" in parts.netloc:
            userinfo, host = parts.netloc.rsplit("@", 1)
            user, _, password = (unquote(x) for x in userinfo.partition(":"))
            url = urlunsplit(parts._replace(netloc=host))
        self._base = url  # what requests go to; the credentials travel as basic auth, never in a URL
        self._secrets = [s for s in (password, user if not password else None) if s]
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.cut_replies = 0
        self._api_key = server_api_key(api_key_env)
        if self._api_key:
            self._secrets.append(self._api_key)
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key and user is None else {}
        self._client = _deadline_client(
            headers=headers,
            auth=httpx.BasicAuth(user, password or "") if user is not None else None,
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
        abandoned = threading.Event()  # the caller is gone (Ctrl-C): no more requests, retries or waits
        fatal: list[RemoteError] = []
        bugs: list[BaseException] = []
        todo = iter(range(n))
        take = threading.Lock()
        parse = functools.partial(_parse_completion, max_tokens=params.max_new_tokens)
        max_bytes = BODY_BYTES + BODY_BYTES_PER_TOKEN * params.max_new_tokens

        def one(i: int) -> None:
            if stop.is_set():
                results[i] = _NOT_SENT
                return
            try:
                answer = self._request("POST", "/chat/completions", self._body(conversations[i], params, i),
                                       parse=parse, max_bytes=max_bytes, abandoned=abandoned)
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

        def worker() -> None:
            try:
                while not abandoned.is_set():
                    with take:
                        i = next(todo, None)
                    if i is None:
                        return
                    one(i)
            except BaseException as e:  # a bug in ``one``: re-raised by the caller, never a thread traceback
                bugs.append(e)
                stop.set()

        # Daemon threads, not a ThreadPoolExecutor: its exit (and the interpreter's) waits for the requests
        # in flight, which kept a Ctrl-C waiting for minutes and made a third one a threading traceback.
        threads = [threading.Thread(target=worker, name=f"raftune-remote-{k}", daemon=True)
                   for k in range(min(self.concurrency, n))]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        except BaseException:
            abandoned.set()
            raise
        if bugs:
            raise bugs[0]
        if fatal:
            raise fatal[0]
        if all(isinstance(r, _Failure) and r.connection for r in results):
            first = next(r for r in results if r is not _NOT_SENT)
            raise RemoteError(f"the server at {self.url} is unreachable: {first.message}")  # type: ignore[union-attr]
        out = [r if isinstance(r, Completion) else _error_completion(r) for r in results]  # type: ignore[arg-type]
        if cut := sum(c.cut for c in out):
            self.cut_replies += cut
            log.warning("%s: %d of %d replies went far beyond max_tokens=%d and were cut to it", self.name, cut, n,
                        params.max_new_tokens)
        return out

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
        answer = self._request("GET", "/models", max_bytes=MODELS_BODY_BYTES)
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

    def _send(self, method: str, path: str, body: dict | None, max_bytes: int) -> httpx.Response:
        """One attempt, within ``timeout_s`` from its start: the answer read whole, or ``_TooLarge`` once
        its body passes ``max_bytes`` (not read further, so a server cannot fill this process's memory)."""
        _DEADLINE.at = time.monotonic() + self.timeout_s
        try:
            with self._client.stream(method, self._base + path, json=body) as r:
                data = bytearray()
                for chunk in r.iter_bytes():  # decoded: a compressed body is capped by what it expands to
                    data += chunk
                    if len(data) > max_bytes:
                        raise _TooLarge
            headers = [(k, v) for k, v in r.headers.multi_items() if k.lower() != "content-encoding"]
            return httpx.Response(r.status_code, headers=headers, content=bytes(data), request=r.request)
        finally:
            _DEADLINE.at = None

    def _request(self, method: str, path: str, body: dict | None = None, parse: Callable | None = None,
                 max_bytes: int = BODY_BYTES, abandoned: threading.Event | None = None) -> Any:
        """The 2xx answer (``parse(answer)`` when ``parse`` is given), or why the last of ``1 + max_retries``
        attempts failed. A 2xx answer that ``parse`` rejects (``ValueError``) is retried like a 5xx:
        a proxy's HTML page or a server's error in a 200 is no answer; so is a body over ``max_bytes``.
        ``abandoned`` set: no further attempt (the caller is gone).

        Raises ``RemoteError`` at once on a 4xx answer other than 429: sending it again won't help.
        """
        url = self.url + path
        attempts = 1 + self.max_retries
        abandoned = abandoned or threading.Event()
        for attempt in range(1, attempts + 1):
            retry_after = None
            try:
                r = self._send(method, path, body, max_bytes)
            except _TooLarge:
                failure = _Failure(f"{method} {url} answered a body over {max_bytes} bytes, more than its limits can "
                                   f"justify; not read further", connection=False)
            except httpx.ConnectError as e:
                failure = _Failure(self._redact(f"cannot connect to {url}: {e}"), connection=True)
            except httpx.ConnectTimeout:
                failure = _Failure(f"connecting to {url} timed out after {self.timeout_s:g}s", connection=True)
            except httpx.TimeoutException:
                failure = _Failure(f"{method} {url} was not answered in full within {self.timeout_s:g}s",
                                   connection=False)
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
            if attempt == attempts or abandoned.is_set():
                return failure
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            if retry_after is not None:
                delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
            log.warning("attempt %d/%d: %s; retrying in %.2fs", attempt, attempts, failure.message, delay)
            if abandoned.wait(delay):
                return failure
        raise AssertionError("unreachable")

    def _http_failure(self, method: str, url: str, r: httpx.Response) -> _Failure:
        """A 429 or 5xx answer as a retryable failure; raises ``RemoteError`` on any other 4xx."""
        message = self._redact(f"{method} {url} answered HTTP {r.status_code}: {_server_message(r)}")
        if r.status_code != 429 and r.status_code < 500:
            raise RemoteError(message)
        return _Failure(message, connection=False)

    def _redact(self, text: str) -> str:
        """``text`` without the API key or the URL's credentials (a server may echo them back)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _error_completion(failure: _Failure) -> Completion:
    return Completion(text="", prompt_tokens=0, completion_tokens=0, finish_reason="error", error=failure.message)


def _parse_completion(r: httpx.Response, max_tokens: int) -> Completion:
    """The completion in a chat completion body; ``ValueError`` saying what is missing when it is none.

    ``choices[0].message.content`` must be a string. ``null`` is accepted only with ``finish_reason``
    ``length``: a model that spent its whole budget before answering (a reasoning model still thinking)
    gave an empty answer, which asking again would not change. A reply beyond ``max_tokens`` is cut
    (``_within_limit``).
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
    return _within_limit(Completion(text=text.strip(), prompt_tokens=_count(usage.get("prompt_tokens")),
                                    completion_tokens=_count(usage.get("completion_tokens")), finish_reason=reason),
                         max_tokens)


def _within_limit(c: Completion, max_tokens: int) -> Completion:
    """``c``, or ``c`` cut (``cut``, ``finish_reason: length``) when the server went past ``max_tokens``:
    its text is over ``max_tokens * MAX_CHARS_PER_TOKEN`` characters, or ``usage.completion_tokens`` is
    over ``max_tokens`` by more than a few (then the text keeps the share ``max_tokens / completion_tokens``).
    The few: a server that counts by re-tokenizing its text overshoots when the limit fell inside a
    multi-byte character (llama-cpp-python: 26 for 24), which is no reply beyond the limit."""
    text, tokens = c.text, c.completion_tokens
    if tokens > max_tokens + max(4, max_tokens // 8):
        text, tokens = text[: len(text) * max_tokens // tokens], max_tokens
    text = text[: max_tokens * MAX_CHARS_PER_TOKEN]
    if text == c.text and tokens == c.completion_tokens:
        return c
    return dataclasses.replace(c, text=text.rstrip(), completion_tokens=tokens, finish_reason="length", cut=True)


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
