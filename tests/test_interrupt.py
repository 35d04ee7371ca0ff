"""Ctrl-C while server requests are in flight: `raftune refine` and `raftune eval`, run as a user runs
them (a subprocess), against a server that takes every request and never answers.

    python -m pytest tests/test_interrupt.py -q

One SIGINT stops the command within seconds with the "run the same command again" message and exit
code 130; two more while it stops change nothing (no threading traceback); nothing half-done is
recorded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class _Silent(BaseHTTPRequestHandler):
    """Reads a chat request, then never answers (until the test ends)."""

    asked = threading.Event()
    done = threading.Event()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        _Silent.asked.set()
        _Silent.done.wait(120)

    def log_message(self, *args):
        pass


@pytest.fixture
def silent_spec():
    _Silent.asked.clear()
    _Silent.done.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Silent)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1#silent"
    _Silent.done.set()
    server.shutdown()
    server.server_close()


def _interrupt(args: list[str], presses: int) -> tuple[int, str, float]:
    """Run ``raftune ARGS``, press Ctrl-C ``presses`` times (0.3 s apart) once the server holds a request;
    (exit code, output, seconds from the first press to the exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "raftune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    try:
        assert _Silent.asked.wait(180), "the command never sent a request"
        time.sleep(0.5)  # the request is in flight
        start = time.monotonic()
        for i in range(presses):
            if i:
                time.sleep(0.3)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out.decode(errors="replace"), time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _qa(path, n: int):
    path.write_text("".join(json.dumps({"question": f"What does f{i} do?", "answer": "It returns a prime."}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.parametrize("presses", [1, 3])
def test_ctrl_c_stops_refine_waiting_on_a_server(tmp_path, silent_spec, presses):
    runs = tmp_path / "runs"
    code, out, seconds = _interrupt(["refine", "--data", str(_qa(tmp_path / "qa.jsonl", 4)), "--model", silent_spec,
                                     "--mode", "sdft", "--out-dir", str(runs), "--timeout-s", "300"], presses)
    assert code == 130, out
    assert seconds < 5 + 0.3 * (presses - 1), out
    assert "interrupted: the samples refined so far are saved; run the same command again to resume" in out
    assert "Traceback" not in out and "Exception" not in out
    assert all(not p.read_text().strip() for p in runs.glob("refine-*/records*.jsonl"))  # no batch recorded


@pytest.mark.parametrize("presses", [1, 3])
def test_ctrl_c_stops_eval_waiting_on_a_server(tmp_path, silent_spec, presses):
    runs = tmp_path / "runs"
    code, out, seconds = _interrupt(["eval", "--model", silent_spec, "--judge", silent_spec, "--domain-data",
                                     str(_qa(tmp_path / "heldout.jsonl", 3)), "--out-dir", str(runs),
                                     "--timeout-s", "300"], presses)
    assert code == 130, out
    assert seconds < 5 + 0.3 * (presses - 1), out
    assert "interrupted: the answers and judge replies so far are saved; run the same command again to resume" in out
    assert "Traceback" not in out and "Exception" not in out
    assert all(not p.read_text().strip() for p in runs.glob("eval-*/completions.jsonl"))  # nothing half logged
    assert not list(runs.glob("eval-*/results.json"))
