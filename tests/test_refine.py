"""Stage 1 end to end: on a tiny random model (plumbing, resume, shards) and on the real embedded model."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import raftune.models
import raftune.refine
import raftune.refine as refine_module
from raftune.files import read_jsonl_log
from raftune.generation import Completion
from raftune.refine import MergeError, RefineConfig, merge, refine


def write_qa(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        f.writelines(json.dumps({"question": f"What does function_{i} do?",
                                 "answer": f"function_{i} returns the {i}-th prime number of the list."}) + "\n"
                     for i in range(n))
    return path


def tiny_cfg(tmp_path, model, data, **kw) -> RefineConfig:
    base = {"data": str(data), "out_dir": str(tmp_path / "runs"), "model": str(model), "judges": (str(model),),
            "tau": -1.0, "rounds": 2, "max_new_tokens": 8, "judge_max_new_tokens": 4, "judge_retries": 1,
            "batch_size": 4, "test_fraction": 0.25, "device": "cpu"}
    base.update(kw)
    return RefineConfig(**base)


def test_refine_end_to_end_on_tiny_model(tmp_path, tiny_model_dir):
    data = write_qa(tmp_path / "qa.jsonl", 12)
    run = refine(tiny_cfg(tmp_path, tiny_model_dir, data), progress=False)

    targets = json.loads((run / "targets.json").read_text())
    fused = [json.loads(l) for l in (run / "fused.jsonl").read_text().splitlines()]
    heldout = [json.loads(l) for l in (run / "heldout.jsonl").read_text().splitlines()]
    prov = [json.loads(l) for l in (run / "provenance.jsonl").read_text().splitlines()]
    assert len(targets) == 9 and len(heldout) == 3
    assert [r["key"] for r in fused] == targets == [r["key"] for r in prov]
    assert not {r["question"] for r in heldout} & {r["question"] for r in fused}
    for r in prov:
        assert r["accepted"] == (r["similarity"] is not None)  # tau=-1 accepts every non-empty rewrite
        if r["accepted"]:
            assert 1 <= r["rounds_used"] <= 2 and len(r["candidates"]) == r["rounds_used"]
        for c in r["candidates"]:
            for v in c["verdicts"]:
                assert v["score"] is None or 1 <= v["score"] <= 10
        # a random model's judge replies are unreadable: never silently scored
        if r["chosen_source"] == "fused":
            assert r["best_mean"] is not None and r["chosen"] in [c["text"] for c in r["candidates"]]
        else:
            assert r["chosen"] == r["answer"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples"] == 9
    assert summary["judge_scores"]["verdicts"] == sum(len(c["verdicts"]) for r in prov for c in r["candidates"])
    assert (run / "similarity_histogram.png").stat().st_size > 1000
    assert (run / "judge_scores.png").stat().st_size > 1000
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["templates"]["rewrite"]["user"]

    # same settings again: nothing to do, same folder, same output
    before = (run / "fused.jsonl").read_text()
    assert refine(tiny_cfg(tmp_path, tiny_model_dir, data), progress=False) == run
    assert (run / "fused.jsonl").read_text() == before
    # a setting that changes the output gives another folder; an execution setting does not
    assert refine(tiny_cfg(tmp_path, tiny_model_dir, data, tau=0.5), progress=False) != run
    assert tiny_cfg(tmp_path, tiny_model_dir, data, batch_size=2).output_settings() == \
        tiny_cfg(tmp_path, tiny_model_dir, data).output_settings()


def test_shards_merge_in_original_order_and_missing_ones_are_named(tmp_path, tiny_model_dir):
    data = write_qa(tmp_path / "qa.jsonl", 10)
    runs = {refine(tiny_cfg(tmp_path, tiny_model_dir, data, shard=(i, 3), test_fraction=0.0), progress=False)
            for i in (0, 2)}
    assert len(runs) == 1
    run = runs.pop()
    assert not (run / "fused.jsonl").exists()
    with pytest.raises(MergeError, match="3 of 10 samples have no record"):
        merge(run)
    refine(tiny_cfg(tmp_path, tiny_model_dir, data, shard=(1, 3), test_fraction=0.0), progress=False)
    fused = [json.loads(l) for l in (run / "fused.jsonl").read_text().splitlines()]
    questions = [json.loads(l)["question"] for l in data.read_text().splitlines()]
    assert [r["question"] for r in fused] == questions
    assert sorted(p.name for p in run.glob("records*.jsonl")) == [f"records.shard-{i}-of-3.jsonl" for i in range(3)]


def test_kill_and_resume_loses_nothing_and_repeats_nothing(tmp_path, tiny_model_dir):
    """SIGKILL a real `raftune refine` process mid-run, start it again: every sample exactly once."""
    data = write_qa(tmp_path / "qa.jsonl", 40)
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "raftune", "refine", "--data", str(data), "--out-dir", str(out),
           "--model", str(tiny_model_dir), "--judge", str(tiny_model_dir), "--tau", "-1", "--rounds", "3",
           "--max-new-tokens", "24", "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    log_rows = 0
    while time.time() < deadline and proc.poll() is None:
        logs = list(out.glob("refine-*/records.jsonl"))
        log_rows = logs[0].read_bytes().count(b"\n") if logs else 0
        if log_rows >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before it could be killed:\n{proc.stdout.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = next(out.glob("refine-*"))
    targets = json.loads((run / "targets.json").read_text())
    partial = read_jsonl_log(run / "records.jsonl", repair=False)
    assert 4 <= len(partial) < len(targets) and not (run / "fused.jsonl").exists()

    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "fused data:" in done.stdout
    log = read_jsonl_log(run / "records.jsonl")
    keys = [r["key"] for r in log]
    assert sorted(keys) == sorted(targets) and len(keys) == len(set(keys)) == 36
    assert [r for r in log if r["key"] in {p["key"] for p in partial}] == partial  # kept, not redone
    fused = [json.loads(l)["key"] for l in (run / "fused.jsonl").read_text().splitlines()]
    assert fused == targets


# --- SDFT mode ------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def only_the_original_model(monkeypatch, model: str) -> list[str]:
    """Make loading anything but ``model`` (a fusion model, a judge, the encoder) fail; the specs opened."""
    opened = []
    real_open = raftune.refine.open_generator

    def open_generator(spec, **opts):
        assert spec == model, f"sdft mode loaded {spec!r}"
        opened.append(spec)
        return real_open(spec, **opts)

    def load_encoder(*args, **kwargs):
        raise AssertionError("sdft mode loaded the sentence encoder")

    monkeypatch.setattr(raftune.refine, "open_generator", open_generator)
    monkeypatch.setattr(raftune.models, "load_encoder", load_encoder)
    return opened


def test_sdft_mode_end_to_end_on_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    data = write_qa(tmp_path / "qa.jsonl", 12)
    raft_run = refine(tiny_cfg(tmp_path, tiny_model_dir, data, limit=1), progress=False)  # for its folder and split

    opened = only_the_original_model(monkeypatch, str(tiny_model_dir))
    # settings SDFT does not read name things that cannot load, and do not change its folder
    cfg = tiny_cfg(tmp_path, tiny_model_dir, data, mode="sdft", judges=("judge-never-loaded",),
                   fusion_model="fusion-never-loaded", encoder="encoder-never-loaded", tau=0.9)
    assert cfg.output_settings() == tiny_cfg(tmp_path, tiny_model_dir, data, mode="sdft").output_settings()
    run = refine(cfg, progress=False)
    assert opened == [str(tiny_model_dir)]
    assert run != raft_run and run.parent == raft_run.parent
    assert (run / "heldout.jsonl").read_bytes() == (raft_run / "heldout.jsonl").read_bytes()

    targets = json.loads((run / "targets.json").read_text())
    fused, prov = read_rows(run / "fused.jsonl"), read_rows(run / "provenance.jsonl")
    assert len(targets) == 9 and [r["key"] for r in fused] == targets == [r["key"] for r in prov]
    assert set(fused[0]) == set(read_rows(raft_run / "fused.jsonl")[0])  # same columns as raft's
    for row, r in zip(fused, prov):
        assert row["original_answer"] == r["answer"] and row["source"] == r["chosen_source"]
        assert r["candidates"] == [] and r["similarity"] is None
        if r["chosen_source"] == "sdft_rewrite":
            assert row["answer"] == r["rewrite"] and r["rewrite"].strip() and r["leak"] is None
        else:
            assert r["chosen_source"] in ("original_leak", "original_no_rewrite")
            assert row["answer"] == r["answer"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "sdft" and summary["samples"] == 9
    assert summary["chosen_source"] == dict(Counter(r["source"] for r in fused))
    assert summary["accepted"] == summary["chosen_source"].get("sdft_rewrite", 0)
    assert summary["judge_scores"]["verdicts"] == 0
    assert not (run / "similarity_histogram.png").exists() and not (run / "judge_scores.png").exists()
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["mode"] == "sdft" and set(resolved["templates"]) == {"sdft"}


class FakeOriginal:
    """The original model, scripted: function_i's rewrite leaks the prompt for i % 3 == 0, is empty
    for i % 3 == 1, and is a clean answer otherwise."""

    name = "fake-original"
    batch_size = 4

    def __init__(self):
        self.prompts: list[str] = []

    def chat(self, conversations, params):
        out = []
        for conv in conversations:
            prompt = conv[-1]["content"]
            self.prompts.append(prompt)
            i = int(re.search(r"function_(\d+)", prompt).group(1))
            text = [f"Reference answer: function_{i} returns a prime.", "",
                    f"function_{i} gives back prime number {i}."][i % 3]
            out.append(Completion(text=text, prompt_tokens=10, completion_tokens=len(text.split()), finish_reason="stop"))
        return out


@pytest.fixture
def fake_original(monkeypatch) -> FakeOriginal:
    fake = FakeOriginal()

    def open_generator(spec, **opts):
        assert spec == "fake-model", f"sdft mode loaded {spec!r}"
        return fake

    monkeypatch.setattr(raftune.refine, "open_generator", open_generator)
    monkeypatch.setattr(raftune.models, "load_encoder", lambda *a, **k: pytest.fail("sdft mode loaded the encoder"))
    return fake


def test_sdft_leaking_and_empty_rewrites_fall_back_to_the_original(tmp_path, fake_original):
    data = write_qa(tmp_path / "qa.jsonl", 12)
    run = refine(tiny_cfg(tmp_path, "fake-model", data, mode="sdft", test_fraction=0.0), progress=False)
    assert len(fake_original.prompts) == 12
    assert all("Using the reference answer as a guide" in p for p in fake_original.prompts)
    prov = read_rows(run / "provenance.jsonl")
    fused = {r["key"]: r for r in read_rows(run / "fused.jsonl")}
    for r in prov:
        i = int(re.search(r"function_(\d+)", r["question"]).group(1))
        source, leak = [("original_leak", "reference answer"), ("original_no_rewrite", None), ("sdft_rewrite", None)][i % 3]
        assert (r["chosen_source"], r["leak"]) == (source, leak)
        want = r["rewrite"] if source == "sdft_rewrite" else r["answer"]
        assert fused[r["key"]]["answer"] == r["chosen"] == want
        assert fused[r["key"]]["original_answer"] == r["answer"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["chosen_source"] == {"original_leak": 4, "original_no_rewrite": 4, "sdft_rewrite": 4}
    assert summary["similarity"]["no_rewrite"] == 4 and summary["accepted"] == 4


def test_sdft_resumes_from_its_log_and_generates_nothing_twice(tmp_path, fake_original):
    data = write_qa(tmp_path / "qa.jsonl", 10)
    cfg = tiny_cfg(tmp_path, "fake-model", data, mode="sdft", test_fraction=0.0)
    first = refine(dataclasses.replace(cfg, limit=4), progress=False)
    assert len(fake_original.prompts) == 4
    run = refine(cfg, progress=False)  # the rest of the targets, into the same folder and log
    assert run == first and len(fake_original.prompts) == 10
    before = (run / "fused.jsonl").read_text()
    assert refine(cfg, progress=False) == run
    assert len(fake_original.prompts) == 10 and (run / "fused.jsonl").read_text() == before
    assert len(read_jsonl_log(run / "records.jsonl")) == 10


def test_sdft_template_override_is_used_and_changes_the_folder(tmp_path, fake_original):
    data = write_qa(tmp_path / "qa.jsonl", 4)
    cfg = tiny_cfg(tmp_path, "fake-model", data, mode="sdft", test_fraction=0.0)
    path = tmp_path / "t.yaml"
    path.write_text("sdft:\n  user: 'Guided by: {answer}\n\nAnswer yourself: {question}'\n")
    # a raft template's text does not concern sdft mode, its own one does
    raft_only = tmp_path / "raft.yaml"
    raft_only.write_text("fuse:\n  user: 'Merge {answer} and {rewrite} for {question}'\n")
    assert dataclasses.replace(cfg, templates=str(raft_only)).output_settings() == cfg.output_settings()
    default_run = refine(cfg, progress=False)
    run = refine(dataclasses.replace(cfg, templates=str(path)), progress=False)
    assert run != default_run and len(fake_original.prompts) == 8
    assert all(p.startswith("Guided by: ") for p in fake_original.prompts[4:])


def test_mode_is_validated():
    with pytest.raises(ValueError, match="setting mode: input should be 'raft' or 'sdft', got str 'dpo'"):
        RefineConfig(data="demo", mode="dpo")


@pytest.mark.slow
def test_refine_a_few_demo_samples_with_the_embedded_model(tmp_path):
    """The real thing on CPU: SmolLM2-135M-Instruct rewrites, fuses and judges 4 demo samples."""
    cfg = RefineConfig(data="demo", out_dir=str(tmp_path), limit=4, batch_size=4, max_new_tokens=96,
                       rounds=2, tau=0.5, device="cpu")
    run = refine(cfg, progress=False)
    prov = [json.loads(l) for l in (run / "provenance.jsonl").read_text().splitlines()]
    assert len(prov) == 4
    for r in prov:
        assert r["rewrite"].strip() and r["rewrite"] != r["answer"]
        assert -1 <= r["similarity"] <= 1
    # the real model relates its rewrites to the originals far better than chance
    assert sum(r["similarity"] for r in prov) / 4 > 0.4
    verdicts = [v for r in prov for c in r["candidates"] for v in c["verdicts"]]
    assert verdicts, "no sample passed tau=0.5: the rewrites are unrelated to the answers"
    assert any(v["score"] is not None for v in verdicts), [v["reply"] for v in verdicts]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples"] == 4 and summary["throughput_samples_per_min"] > 0


@pytest.mark.slow
def test_judges_can_be_local_and_remote_together(tmp_path, tiny_model_dir, llama_url, monkeypatch):
    """Original and fusion model local, one judge local and one a real OpenAI-compatible server."""
    from conftest import KEY, KEY_ENV

    monkeypatch.setenv(KEY_ENV, KEY)
    data = write_qa(tmp_path / "qa.jsonl", 5)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, data, judges=(str(tiny_model_dir), llama_url),
                   api_key_env=KEY_ENV, test_fraction=0.0, rounds=1, judge_max_new_tokens=12)
    run = refine(cfg, progress=False)
    prov = [json.loads(l) for l in (run / "provenance.jsonl").read_text().splitlines()]
    judged = [c for r in prov for c in r["candidates"] if c["verdicts"]]
    assert judged
    for c in judged:
        names = [v["judge"] for v in c["verdicts"]]
        assert names[0] == str(tiny_model_dir) and names[1].startswith(llama_url + "#")
        remote = c["verdicts"][1]
        assert remote["reply"] and not remote["reply"].startswith("<error")  # the server answered
    assert KEY not in "".join(p.read_text() for p in run.iterdir() if p.suffix in (".json", ".jsonl"))


# --- failed server calls: never a result, retried by the next run ----------------------------------


def _refine_reply(prompt: str) -> str:
    """The fake server as the original, fusion and judge model: a readable score, except for "vague_" samples."""
    name = re.search(r"\w*function_\d+", prompt).group(0)
    if "Rate it from 1" in prompt:  # the judge template
        return "I cannot tell." if name.startswith("vague_") else "Score: 9"
    if "Write one answer" in prompt:  # the fuse template
        return f"Merged: {name} returns the prime number of the list."
    return f"In other words, {name} returns the prime number of the list."


@pytest.mark.parametrize("failure", ["5xx", "html", "no-choices", "null-content"])
def test_failed_server_calls_are_not_recorded_and_a_rerun_retries_exactly_them(tmp_path, fake_chat_server, failure):
    """Fusion calls of flaky_fuse_ samples and judge calls of flaky_judge_ samples fail after their
    retries: those samples get no record, the others do, and the run raises. Once the server is fixed,
    the same config asks only for the failed samples and completes. A vague_ sample's unreadable judge
    replies are no failure: it is recorded as original_unjudged both times."""
    server = fake_chat_server
    server.reply, server.failure = _refine_reply, failure
    server.fail = lambda p: ("flaky_fuse_" in p and "Write one answer" in p) or ("flaky_judge_" in p and "Rate it from 1" in p)
    names = [["", "flaky_fuse_", "flaky_judge_", "vague_"][i % 4] + f"function_{i}" for i in range(8)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What does {n} do?", "answer": f"{n} returns the prime number."})
                            + "\n" for n in names))
    cfg = tiny_cfg(tmp_path, server.spec, data, fusion_model=server.spec, judges=(server.spec,), test_fraction=0.0)

    with pytest.raises(raftune.refine.GenerationFailed, match=r"4 of 8 samples failed.*Run the same command again") as e:
        refine(cfg, progress=False)
    run = e.value.run_dir
    errors = {f["key"]: f["errors"] for f in e.value.failed}
    name_of = dict(zip(json.loads((run / "targets.json").read_text()), names))
    assert sorted(name_of[k] for k in errors) == ["flaky_fuse_function_1", "flaky_fuse_function_5",
                                                  "flaky_judge_function_2", "flaky_judge_function_6"]
    why = {"5xx": "answered HTTP 503: overloaded", "html": "no chat completion (the body is not JSON): <html>",
           "no-choices": "no chat completion (no choices)", "null-content": "content is not a string"}[failure]
    for k, errs in errors.items():
        phase = "fusion round 1: POST" if name_of[k].startswith("flaky_fuse_") else f"round 1 judge {server.spec}: POST"
        assert len(errs) == 1 and errs[0].startswith(phase) and why in errs[0], errs
    failed_calls = [p for p in server.requests if server.fail(p)]
    assert len(failed_calls) == 2 * 4 and len(set(failed_calls)) == 4  # each retried once, then given up
    records = read_jsonl_log(run / "records.jsonl")
    assert sorted(r["question"].split()[2] for r in records) == sorted(n for n in names if not n.startswith("flaky"))
    assert {r["chosen_source"] for r in records if "vague_" in r["question"]} == {"original_unjudged"}
    assert not (run / "fused.jsonl").exists() and not (run / "summary.json").exists()

    server.fail = lambda p: False  # fixed
    server.requests.clear()
    assert refine(cfg, progress=False) == run
    asked = [re.search(r"\w*function_\d+", p).group(0) for p in server.requests]
    # rewrite, fusion (scored 9 at once: no second round) and judge of each failed sample, nothing else
    assert sorted(asked) == sorted(n for n in names if n.startswith("flaky") for _ in range(3))
    fused = read_rows(run / "fused.jsonl")
    assert [r["source"] for r in fused] == ["original_unjudged" if n.startswith("vague_") else "fused" for n in names]
    assert all("Merged:" in r["answer"] for r in fused if r["source"] == "fused")
    prov = read_rows(run / "provenance.jsonl")
    assert all(v["error"] is None for r in prov for c in r["candidates"] for v in c["verdicts"])


def test_a_failed_rewrite_in_sdft_mode_is_not_recorded(tmp_path, fake_chat_server):
    server = fake_chat_server
    server.reply = lambda p: "It returns a prime number."
    server.fail = lambda p: "function_1 " in p or "function_2 " in p
    data = write_qa(tmp_path / "qa.jsonl", 4)
    cfg = tiny_cfg(tmp_path, server.spec, data, mode="sdft", test_fraction=0.0)
    with pytest.raises(raftune.refine.GenerationFailed, match="2 of 4 samples failed") as e:
        refine(cfg, progress=False)
    assert all(f["errors"][0].startswith("rewrite: POST") for f in e.value.failed)
    assert [r["question"] for r in read_jsonl_log(e.value.run_dir / "records.jsonl")] == \
        ["What does function_0 do?", "What does function_3 do?"]
    server.fail = lambda p: False
    server.requests.clear()
    run = refine(cfg, progress=False)
    assert len(server.requests) == 2
    assert [r["source"] for r in read_rows(run / "fused.jsonl")] == ["sdft_rewrite"] * 4


def test_judge_errors_fail_the_sample_with_local_original_and_fusion(tmp_path, tiny_model_dir, fake_chat_server):
    """The tiny local model rewrites and fuses; the judge is the server, down for the first run: every
    sample that reached the judge fails (the others are recorded for what they are), and the rerun asks
    the judge only for those."""
    server = fake_chat_server
    server.reply = lambda p: "Score: 9"
    server.fail = lambda p: True
    data = write_qa(tmp_path / "qa.jsonl", 8)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, data, judges=(server.spec,), test_fraction=0.0, rounds=1)
    with pytest.raises(raftune.refine.GenerationFailed) as e:
        refine(cfg, progress=False)
    failed = {f["key"] for f in e.value.failed}
    judged_questions = {re.search(r"function_\d+", p).group(0) for p in server.requests}
    records = read_jsonl_log(e.value.run_dir / "records.jsonl")
    assert failed and len(failed) == len(judged_questions) and not failed & {r["key"] for r in records}
    assert not any(c["verdicts"] for r in records for c in r["candidates"])  # recorded: never reached the judge
    server.fail = lambda p: False
    server.requests.clear()
    run = refine(cfg, progress=False)
    assert {re.search(r"function_\d+", p).group(0) for p in server.requests} == judged_questions
    assert len(read_rows(run / "fused.jsonl")) == 8


def test_a_sample_too_long_for_the_model_is_kept_unrefined_and_counted(tmp_path, tiny_model_dir, monkeypatch):
    """The length guard of stage 1: a sample whose question and answer exceed the input budget is not sent
    to any model; it keeps its original answer as original_too_long, counted in the summary."""
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is q{i}?", "answer": f"a{i} " * (400 if i == 2 else 3)} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    asked = []
    real_open = refine_module.open_generator

    def spy(spec, **kw):
        gen = real_open(spec, **kw)
        real_chat = gen.chat

        def chat(conversations, params):
            asked.extend(c[-1]["content"] for c in conversations)
            return real_chat(conversations, params)

        gen.chat = chat
        return gen

    monkeypatch.setattr(refine_module, "open_generator", spy)
    cfg = RefineConfig(data=str(data), out_dir=str(tmp_path / "runs"), model=str(tiny_model_dir), judges=(str(tiny_model_dir),),
                       max_new_tokens=4, judge_max_new_tokens=4, rounds=1, tau=-1.0, test_fraction=0.0, device="cpu",
                       max_input_tokens=100)
    run = refine(cfg, progress=False)
    fused = [json.loads(l) for l in (run / "fused.jsonl").read_text().splitlines()]
    long = [r for r in fused if r["source"] == "original_too_long"]
    assert len(long) == 1 and long[0]["answer"] == rows[2]["answer"].strip()
    assert not any(rows[2]["answer"][:50] in a for a in asked)  # never sent to a model
    assert json.loads((run / "summary.json").read_text())["chosen_source"]["original_too_long"] == 1
