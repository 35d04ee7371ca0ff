"""The remote backend against real local servers: llama.cpp's OpenAI-compatible server on the embedded
SmolLM2 GGUF, and a small ``http.server`` stub that fails on purpose to exercise retries.

    python -m pytest tests/test_remote.py -q

The llama.cpp tests need ``bash scripts/install_llama_server.sh`` (CI runs it); the stub tests need nothing.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import KEY, KEY_ENV, free_port

from raftune.generation import Completion, SamplingParams, open_generator
from raftune.generation.remote import OpenAIChatGenerator, RemoteError, _retry_after_s


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- llama.cpp's server on the embedded model (fixture llama_url in conftest.py) ----------


@pytest.fixture
def llama(llama_url, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with OpenAIChatGenerator(llama_url, api_key_env=KEY_ENV, concurrency=3, timeout_s=60, max_retries=1) as gen:
        yield gen


QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What animal barks?",
    "What is the opposite of hot?",
]


@pytest.mark.slow
def test_batch_returns_one_completion_per_conversation_in_order(llama):
    # model=None above: the model id came from GET /models
    assert llama.model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert llama.name == f"{llama.url}#{llama.model}"

    out = llama.chat([_user(q) for q in QUESTIONS], SamplingParams(max_new_tokens=24))
    assert len(out) == len(QUESTIONS)
    assert all(c.error is None and c.text and c.finish_reason in ("stop", "length") for c in out)
    # no upper bound here: llama-cpp-python counts completion tokens by re-tokenizing the text, which
    # can exceed max_tokens when the cut falls inside a multi-byte character (26 for the emoji answer)
    assert all(c.completion_tokens > 0 and c.prompt_tokens > 0 for c in out)
    # in order: each answer is the one a single request for that question gets
    for i in (0, 3, 5):
        assert llama.chat([_user(QUESTIONS[i])], SamplingParams(max_new_tokens=24))[0].text == out[i].text


@pytest.mark.slow
def test_greedy_is_deterministic_and_seeded_sampling_reproducible(llama):
    convs = [_user(q) for q in QUESTIONS[:3]]
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    assert llama.chat(convs, greedy) == llama.chat(convs, greedy)
    # The server reuses the KV cache of the previous request's common prefix, and a prompt evaluated in
    # other chunks gives logits that differ in the last bits, which temperature-1 sampling can amplify.
    # So the seeded requests go one at a time, each sequence after the same request: the server is in the
    # same state before each of its requests in both runs, and only the seed decides the sample.
    seeded = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11)
    with OpenAIChatGenerator(llama.url, model=llama.model, api_key_env=KEY_ENV, concurrency=1, timeout_s=60) as one:
        runs = []
        for _ in range(2):
            one.chat([_user("Hello.")], greedy)
            runs.append([c.text for c in one.chat(convs, seeded)])
    assert runs[0] == runs[1]
    other = SamplingParams(max_new_tokens=16, temperature=1.0, seed=12)
    with OpenAIChatGenerator(llama.url, model=llama.model, api_key_env=KEY_ENV, concurrency=1, timeout_s=60) as one:
        one.chat([_user("Hello.")], greedy)
        assert [c.text for c in one.chat(convs, other)] != runs[0]  # the seed is what decides


@pytest.mark.slow
def test_max_new_tokens_is_respected(llama):
    out = llama.chat([_user("Write a long story about a dragon.")] * 2, SamplingParams(max_new_tokens=3))
    assert [c.finish_reason for c in out] == ["length", "length"]
    assert all(0 < c.completion_tokens <= 3 for c in out)


@pytest.mark.slow
def test_api_key_is_sent_and_never_shown(llama_url, llama, monkeypatch, caplog):
    assert llama.chat([_user("Hi")], SamplingParams(max_new_tokens=2))[0].error is None
    assert KEY not in repr(llama) and KEY not in llama.name

    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RemoteError, match="401") as no_key:
        OpenAIChatGenerator(llama_url, model="m", api_key_env=KEY_ENV).chat([_user("Hi")], SamplingParams())
    assert "Invalid API key" in str(no_key.value)

    wrong = KEY + "-wrong"
    monkeypatch.setenv(KEY_ENV, wrong)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(RemoteError, match="401") as bad_key:
            OpenAIChatGenerator(llama_url, api_key_env=KEY_ENV)  # model discovery is refused too
        gen = OpenAIChatGenerator(llama_url, model="m", api_key_env=KEY_ENV)
    assert wrong not in str(bad_key.value) and wrong not in repr(gen) and wrong not in caplog.text


@pytest.mark.slow
def test_open_generator_parses_the_spec(llama_url, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    gen = open_generator(f"{llama_url}/#my-model", api_key_env=KEY_ENV)
    assert isinstance(gen, OpenAIChatGenerator) and gen.model == "my-model" and gen.url == llama_url
    assert open_generator(f"{llama_url}/#my-model", api_key_env=KEY_ENV) is gen


# --- failures: an unreachable server, and a stub that fails on purpose -------------------------


def test_unreachable_server_raises_quickly():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RemoteError, match=f"server at {url} is unreachable"):
        OpenAIChatGenerator(url, model="m", max_retries=1, backoff_s=0.01, timeout_s=2).chat(
            [_user(q) for q in QUESTIONS], SamplingParams()
        )
    with pytest.raises(RemoteError, match="unreachable"):
        OpenAIChatGenerator(url, max_retries=0, timeout_s=2)  # model discovery
    assert time.monotonic() - start < 5


# 200 answers that are no chat completion: (body, headers, content type), and what the error then says
GARBLED = {
    "html": ("<html><body>502 Bad Gateway</body></html>", None, "text/html"),
    "empty": ("", None, "text/plain"),
    "no-choices": ({"object": "error", "message": "model not loaded"}, None, "application/json"),
    "empty-choices": ({"choices": []}, None, "application/json"),
    "no-message": ({"choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}, None, "application/json"),
    "null-content": ({"choices": [{"message": {"content": None}, "finish_reason": "stop"}]}, None, "application/json"),
    "list-content": ({"choices": [{"message": {"content": [{"type": "text"}]}}]}, None, "application/json"),
    "json-list": ([1, 2], None, "application/json"),
}
NOT_A_STRING = "choices[0].message.content is not a string"
GARBLED_WHY = {"html": "the body is not JSON", "empty": "the body is not JSON", "no-choices": "no choices",
               "empty-choices": "no choices", "no-message": NOT_A_STRING, "null-content": NOT_A_STRING,
               "list-content": NOT_A_STRING, "json-list": "no choices"}


class _Stub(BaseHTTPRequestHandler):
    """Answers by the last user message: "flaky" fails with 503 twice then succeeds, "down" always
    answers 503, "busy" answers 429 with Retry-After once, "reject" answers 400; "garbled:KIND" always
    answers 200 with a body that is no chat completion (``GARBLED[KIND]``), "garbled-once" does so once,
    "thinking" gets ``content: null`` with ``finish_reason: length``; anything else succeeds."""

    seen: dict[str, int] = {}
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.seen[prompt] = n = self.seen.get(prompt, 0) + 1
        if (prompt == "flaky" and n <= 2) or prompt == "down":
            self._send(503, {"error": {"message": "overloaded"}})
        elif prompt == "busy" and n == 1:
            self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"})
        elif prompt == "reject":
            self._send(400, {"error": {"message": "messages must not say reject"}})
        elif prompt.startswith("garbled:") or (prompt == "garbled-once" and n == 1):
            self._send(200, *GARBLED[prompt.partition(":")[2] or "no-choices"])
        elif prompt == "thinking":
            answer = {"role": "assistant", "content": None, "reasoning_content": "Let me think"}
            self._send(200, {"choices": [{"index": 0, "message": answer, "finish_reason": "length"}]})
        else:
            answer = {"role": "assistant", "content": f" echo: {prompt} (seed {body.get('seed')}) "}
            usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
            self._send(200, {"choices": [{"index": 0, "message": answer, "finish_reason": "stop"}], "usage": usage})

    def _send(self, status, obj, headers=None, content_type="application/json"):
        data = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
        self.send_response(status)
        for k, v in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub(monkeypatch):
    _Stub.seen = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv(KEY_ENV, KEY)
    yield OpenAIChatGenerator(
        f"http://127.0.0.1:{server.server_address[1]}/v1/", model="stub", api_key_env=KEY_ENV,
        concurrency=4, timeout_s=5, max_retries=3, backoff_s=0.01,
    )
    server.shutdown()
    server.server_close()


def test_retries_5xx_with_backoff_then_succeeds(stub, caplog):
    with caplog.at_level(logging.WARNING, logger="raftune.remote"):
        out = stub.chat([_user("flaky"), _user("steady")], SamplingParams(seed=100))
    assert _Stub.seen == {"flaky": 3, "steady": 1}
    assert out[0] == Completion("echo: flaky (seed 100)", 5, 7, "stop")
    assert out[1].text == "echo: steady (seed 101)"  # seed + index
    retries = [r for r in caplog.records if r.name == "raftune.remote"]
    assert len(retries) == 2 and all("503" in r.getMessage() and "overloaded" in r.getMessage() for r in retries)
    assert KEY not in caplog.text


def test_429_waits_at_least_retry_after(stub):
    start = time.monotonic()
    out = stub.chat([_user("busy")], SamplingParams())
    assert out[0].text.startswith("echo: busy") and _Stub.seen == {"busy": 2}
    assert time.monotonic() - start >= 0.2


def test_request_failing_after_its_retries_becomes_an_error_completion(stub):
    out = stub.chat([_user("ok"), _user("down"), _user("ok too")], SamplingParams())
    assert _Stub.seen["down"] == 4  # 1 + max_retries
    assert [c.finish_reason for c in out] == ["stop", "error", "stop"]
    assert out[1].text == "" and "HTTP 503" in out[1].error and "overloaded" in out[1].error


@pytest.mark.parametrize("kind", sorted(GARBLED))
def test_a_200_that_is_no_chat_completion_is_retried_then_becomes_an_error_completion(stub, kind, caplog):
    with caplog.at_level(logging.WARNING, logger="raftune.remote"):
        out = stub.chat([_user("ok"), _user(f"garbled:{kind}")], SamplingParams())
    assert _Stub.seen[f"garbled:{kind}"] == 4  # 1 + max_retries, like a 5xx
    assert out[0].text.startswith("echo: ok") and out[0].error is None
    bad = out[1]
    assert (bad.text, bad.finish_reason) == ("", "error")
    assert f"answered HTTP 200 with no chat completion ({GARBLED_WHY[kind]})" in bad.error
    assert len([r for r in caplog.records if "no chat completion" in r.getMessage()]) == 3


def test_a_garbled_answer_then_a_good_one_succeeds(stub):
    out = stub.chat([_user("garbled-once")], SamplingParams())
    assert _Stub.seen == {"garbled-once": 2} and out[0].text.startswith("echo: garbled-once") and out[0].error is None


def test_null_content_at_the_length_limit_is_an_empty_answer_not_a_failure(stub):
    # a reasoning model that spent max_tokens thinking: asking again would give the same
    out = stub.chat([_user("thinking")], SamplingParams(max_new_tokens=4))
    assert _Stub.seen == {"thinking": 1} and out[0] == Completion("", 0, 0, "length")


def test_client_error_is_not_retried_and_raises_the_server_message(stub):
    with pytest.raises(RemoteError, match="HTTP 400: messages must not say reject"):
        stub.chat([_user("reject")], SamplingParams())
    assert _Stub.seen == {"reject": 1}


def test_retry_after_header_parsing():
    assert _retry_after_s("3") == 3.0 and _retry_after_s(None) is None and _retry_after_s("soon") is None
    assert _retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
