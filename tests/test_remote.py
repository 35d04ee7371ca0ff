"""The remote backend against real local servers: llama.cpp's OpenAI-compatible server on the embedded
SmolLM2 GGUF, and a small ``http.server`` stub that fails on purpose to exercise retries.

    python -m pytest tests/test_remote.py -q

The llama.cpp tests need ``bash scripts/install_llama_server.sh`` (CI runs it); the stub tests need nothing.
"""
from __future__ import annotations

import json
import logging
import re
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
    with pytest.raises(ValueError, match=f"{KEY_ENV} is not set"):  # named and unset: refused before asking
        OpenAIChatGenerator(llama_url, model="m", api_key_env=KEY_ENV)
    monkeypatch.delenv("RAFTUNE_API_KEY", raising=False)
    with pytest.raises(RemoteError, match="401") as no_key:  # the default left unset: asked without a key
        OpenAIChatGenerator(llama_url, model="m").chat([_user("Hi")], SamplingParams())
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
    "thinking" gets ``content: null`` with ``finish_reason: length``; "trickle-head" and "trickle-body"
    get their answer a byte every 0.2 s (from its status line, or from its body on), "endless" a body
    that never ends, "long" 100,000 characters, "overcount" a reply whose usage says 10x max_tokens;
    anything else succeeds. ``auth`` holds every Authorization header received (None: none)."""

    seen: dict[str, int] = {}
    auth: list = []
    lock = threading.Lock()

    def do_GET(self):
        self.auth.append(self.headers.get("Authorization"))
        self._send(200, {"object": "list", "data": [{"id": "stub-model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.seen[prompt] = n = self.seen.get(prompt, 0) + 1
            self.auth.append(self.headers.get("Authorization"))
        if prompt in ("trickle-head", "trickle-body", "endless"):
            self._stream(prompt)
        elif prompt in ("long", "overcount"):
            text = "x" * 100_000 if prompt == "long" else "word " * 40
            usage = {"completion_tokens": 10 * body["max_tokens"] if prompt == "overcount" else 3}
            self._send(200, {"choices": [{"message": {"content": text}, "finish_reason": "stop"}], "usage": usage})
        elif (prompt == "flaky" and n <= 2) or prompt == "down":
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

    def _stream(self, kind):
        """A valid answer sent slowly (trickle-*), or a body without end (endless), for up to 30 s."""
        data = json.dumps({"choices": [{"message": {"content": "slow"}, "finish_reason": "stop"}]}).encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data)
        try:
            if kind == "endless":
                self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"choices\": \"")
                for _ in range(500):  # 32 MB in about a second: 30 times the cap of max_tokens=256
                    self.wfile.write(b"x" * 65536)
                    time.sleep(0.002)
                return
            slow = head + data if kind == "trickle-head" else data
            if kind == "trickle-body":
                self.wfile.write(head)
            for i in range(min(len(slow), 150)):
                self.wfile.write(slow[i : i + 1])
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass  # the client gave up: what it should do

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_url(monkeypatch):
    """The stub's API base, served from threads; KEY_ENV holds KEY."""
    _Stub.seen, _Stub.auth = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv(KEY_ENV, KEY)
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture
def stub(stub_url):
    return OpenAIChatGenerator(stub_url + "/", model="stub", api_key_env=KEY_ENV, concurrency=4, timeout_s=5,
                               max_retries=3, backoff_s=0.01)


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


# --- bounds: a whole request within timeout_s, a reply within what max_tokens justifies --------------


@pytest.mark.parametrize("kind", ["trickle-head", "trickle-body"])
def test_a_trickling_answer_fails_at_the_timeout(stub_url, kind):
    """A server sending a byte every 0.2 s never lets a read time out; the request still ends at timeout_s
    (a whole request, not each read), failed like any time-out, and a retry gets the same bound."""
    gen = OpenAIChatGenerator(stub_url, model="stub", timeout_s=1.5, max_retries=1, backoff_s=0.0)
    start = time.monotonic()
    out = gen.chat([_user(kind), _user("quick")], SamplingParams())
    assert time.monotonic() - start < 1.5 * 2 + 1.5  # two attempts of 1.5 s, and slack for a loaded machine
    assert out[0].finish_reason == "error" and "was not answered in full within 1.5s" in out[0].error
    assert _Stub.seen[kind] == 2 and out[1].text.startswith("echo: quick")


def test_a_reply_far_beyond_max_tokens_is_cut_and_counted(stub):
    out = stub.chat([_user("long"), _user("overcount"), _user("fine")], SamplingParams(max_new_tokens=16))
    long, over, fine = out
    assert long.cut and long.finish_reason == "length" and long.text == "x" * (16 * 32)  # MAX_CHARS_PER_TOKEN
    # usage says 160 tokens for 16 asked: the text keeps a tenth (200 characters -> 20), the count is the limit
    assert over.cut and over.completion_tokens == 16 and over.text == ("word " * 4).strip()
    assert not fine.cut and fine.text.startswith("echo: fine") and fine.finish_reason == "stop"
    assert stub.cut_replies == 2
    stub.chat([_user("long")], SamplingParams(max_new_tokens=16))
    assert stub.cut_replies == 3


def test_a_slight_overcount_of_a_server_is_no_cut():
    """llama-cpp-python counts 26 tokens for an answer cut at 24 inside a multi-byte character: no reply
    beyond the limit, so nothing is cut."""
    from raftune.generation.remote import _within_limit

    c = Completion("a story 🐉", 10, 26, "length")
    assert _within_limit(c, 24) is c
    assert _within_limit(Completion("y" * 400, 10, 100, "stop"), 24).text == "y" * 96


def test_an_endless_body_is_not_read_whole(stub):
    start = time.monotonic()
    out = stub.chat([_user("endless")], SamplingParams(max_new_tokens=256))
    cap = 2**20 + 256 * 256
    assert out[0].finish_reason == "error" and f"answered a body over {cap} bytes" in out[0].error
    assert _Stub.seen["endless"] == 4 and time.monotonic() - start < 10  # retried like a 5xx, each cut short


# --- credentials: the API key variable, and a URL's user and password ----------------------------------


def test_an_api_key_variable_named_but_unset_is_an_error_before_any_request(stub_url, monkeypatch):
    monkeypatch.delenv("RAFTUNE_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable RAFTUNE_TEST_UNSET_KEY is not set"):
        OpenAIChatGenerator(stub_url, api_key_env="RAFTUNE_TEST_UNSET_KEY")  # would ask GET /models
    assert _Stub.auth == []
    # the default variable unset: a server without a key, asked without one
    monkeypatch.delenv("RAFTUNE_API_KEY", raising=False)
    gen = OpenAIChatGenerator(stub_url)
    assert gen.model == "stub-model" and gen.chat([_user("hi")], SamplingParams())[0].error is None
    assert _Stub.auth == [None, None]
    OpenAIChatGenerator(stub_url, model="m", api_key_env=KEY_ENV).chat([_user("hi")], SamplingParams())
    assert _Stub.auth[-1] == f"Bearer {KEY}"


def test_an_unset_api_key_variable_stops_eval_and_refine_with_exit_2_and_nothing_written(stub_url, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from raftune.cli import app

    monkeypatch.delenv("RAFTUNE_TEST_UNSET_KEY", raising=False)
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "q?", "answer": "a."}) + "\n")
    runs = tmp_path / "runs"
    for command in (["eval", "--domain-data", str(data)], ["refine", "--data", str(data)]):
        result = CliRunner().invoke(app, [*command, "--model", f"{stub_url}#stub", "--judge", f"{stub_url}#stub",
                                          "--out-dir", str(runs), "--api-key-env", "RAFTUNE_TEST_UNSET_KEY"])
        assert result.exit_code == 2, result.output
        assert "environmentvariableRAFTUNE_TEST_UNSET_KEYisnotset" in re.sub(r"[│╭╮╰╯─\s]+", "", result.output)
        assert "Traceback" not in result.output
    assert not runs.exists() and _Stub.auth == []


def test_public_spec_masks_the_credentials_of_a_server_url():
    from raftune.generation import public_spec

    assert public_spec("http://alice:s3cret@host:8000/v1#m") == "http://alice:***@host:8000/v1#m"
    assert public_spec("https://tok3n@host/v1") == "https://***@host/v1"  # a lone user part may be a token
    assert public_spec("http://a:p@ss@host/v1") == "http://a:***@host/v1"  # an unescaped @ in the password
    for spec in ("http://host:8000/v1#m", "default", "runs/train-x/model", "me@org/model"):
        assert public_spec(spec) == spec


def test_credentials_in_the_url_reach_the_server_as_basic_auth_and_nowhere_else(stub_url, caplog):
    import base64

    url = stub_url.replace("http://", "http://alice:s3cr%40t@")  # a password with an escaped @
    with caplog.at_level(logging.DEBUG):
        gen = OpenAIChatGenerator(url, api_key_env=KEY_ENV, max_retries=1, backoff_s=0.0)
        assert gen.chat([_user("hi")], SamplingParams())[0].error is None
        with pytest.raises(RemoteError) as refused:
            gen.chat([_user("reject")], SamplingParams())
        failed = gen.chat([_user("down")], SamplingParams())[0]
    basic = "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert _Stub.auth == [basic] * 5  # GET /models, hi, reject, down twice: the URL's credentials, not the key
    shown = [gen.name, gen.url, repr(gen), str(refused.value), failed.error, caplog.text]
    assert gen.url == stub_url.replace("http://", "http://alice:***@")
    assert not any(secret in text for text in shown for secret in ("s3cr", KEY))


# --- the stages: eval's server settings, and no credentials in any run folder ---------------------------


def test_eval_takes_the_server_settings_and_they_leave_its_folder_as_it_was(stub_url, tmp_path, monkeypatch):
    """timeout_s, concurrency and api_key_env reach every server backend eval opens (the answer that
    trickles fails at eval's 1 s), and, being how rather than what, they do not change the run folder."""
    import dataclasses

    from raftune.evaluate import EvalConfig, evaluate, run_dir_for
    from raftune.generation import GenerationFailed, remote

    opened = []

    class NoRetries(remote.OpenAIChatGenerator):  # what open_generator builds: the trickle fails once, not 5 times
        def __init__(self, url, **kw):
            super().__init__(url, **{**kw, "max_retries": 0})
            opened.append(self)

    monkeypatch.setattr(remote, "OpenAIChatGenerator", NoRetries)
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "a."}) + "\n" for q in ["trickle-head", "fine"]))
    cfg = EvalConfig(model=f"{stub_url}#stub", judges=(f"{stub_url}#judge",), domain_data=str(data), timeout_s=1.0,
                     concurrency=3, api_key_env=KEY_ENV, max_new_tokens=8, judge_retries=0,
                     out_dir=str(tmp_path / "runs"), device="cpu")
    start = time.monotonic()
    with pytest.raises(GenerationFailed, match="was not answered in full within 1s"):
        evaluate(cfg, progress=False)
    assert time.monotonic() - start < 20
    assert sorted(g.name.rsplit("#")[1] for g in opened) == ["judge", "stub"]
    assert all(g.timeout_s == 1.0 and g.concurrency == 3 for g in opened)
    assert set(_Stub.auth) == {f"Bearer {KEY}"}
    defaults = dataclasses.replace(cfg, timeout_s=120.0, concurrency=8, api_key_env="RAFTUNE_API_KEY")
    assert run_dir_for(defaults) == run_dir_for(cfg)


def _answers(prompt: str) -> str:
    if "Rate it from 1" in prompt:  # refine's judge
        return "Score: 9"
    if "Is the candidate answer correct" in prompt:  # eval's domain judge
        return "Verdict: correct"
    return "It returns the prime number of the list."


def test_no_file_or_message_of_refine_and_eval_holds_a_url_password(fake_chat_server, tmp_path, caplog):
    """A server spec with credentials, as the model, fusion model and judges of refine and eval (one eval
    sample failing, so that errors are recorded too): no file of the run folders, no log line and no error
    holds the password, and another password gives the same run folders."""
    from raftune.evaluate import EvalConfig, evaluate
    from raftune.generation import GenerationFailed
    from raftune.refine import RefineConfig, refine

    server = fake_chat_server
    server.reply = _answers
    server.fail = lambda p: "flaky" in p
    spec = server.spec.replace("http://", "http://alice:s3cret-pw@")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What does f{i} do?", "answer": "It returns a prime."}) + "\n"
                            for i in range(4)))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"question": q, "answer": "A prime."}) + "\n" for q in ["What is f?", "flaky?"]))
    runs = tmp_path / "runs"
    common = dict(model=spec, judges=(spec,), out_dir=str(runs), max_new_tokens=8, judge_max_new_tokens=4,
                  judge_retries=0, device="cpu")
    with caplog.at_level(logging.DEBUG):
        run = refine(RefineConfig(data=str(data), fusion_model=spec, tau=-1.0, rounds=1, test_fraction=0.0, **common),
                     progress=False)
        with pytest.raises(GenerationFailed) as failed:
            evaluate(EvalConfig(domain_data=str(heldout), **common), progress=False)
    eval_run = failed.value.run_dir
    assert (run / "summary.json").exists() and "failed" in json.loads((eval_run / "results.json").read_text())
    files = [p for folder in (run, eval_run) for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 8
    holding = [str(p) for p in files if b"s3cret" in p.read_bytes()]
    assert holding == [] and "s3cret" not in caplog.text and "s3cret" not in str(failed.value)
    assert "alice:***@" in (run / "config.json").read_text()
    other = spec.replace("s3cret-pw", "another-pw")
    again = refine(RefineConfig(data=str(data), fusion_model=other, tau=-1.0, rounds=1, test_fraction=0.0,
                                **{**common, "model": other, "judges": (other,)}), progress=False)
    assert again == run


def test_cut_replies_are_counted_in_refine_summary_and_eval_results(fake_chat_server, tmp_path):
    """A server ignoring max_tokens (5,000 characters for 8 tokens): every such reply is cut to 8 * 32
    characters, and the stages count them: refine's summary.json, eval's results.json."""
    from raftune.evaluate import EvalConfig, evaluate
    from raftune.refine import RefineConfig, refine

    server = fake_chat_server
    server.reply = lambda p: "Verdict: correct" if "Is the candidate answer correct" in p else "x" * 5000
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What does f{i} do?", "answer": "A prime."}) + "\n" for i in range(4)))
    common = dict(model=server.spec, out_dir=str(tmp_path / "runs"), max_new_tokens=8, device="cpu")
    run = refine(RefineConfig(data=str(data), mode="sdft", test_fraction=0.0, **common), progress=False)
    assert json.loads((run / "summary.json").read_text())["cut_replies"] == 4
    assert {r["answer"] for r in map(json.loads, (run / "fused.jsonl").read_text().splitlines())} == {"x" * 256}
    eval_run = evaluate(EvalConfig(judges=(server.spec,), domain_data=str(data), judge_retries=0, **common),
                        progress=False)
    results = json.loads((eval_run / "results.json").read_text())
    assert results["cut_replies"] == 4 and results["suites"]["domain"]["d_acc"] == 1.0  # the judges' replies fit
