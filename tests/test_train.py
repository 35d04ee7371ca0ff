"""Stage 2 end to end on a tiny random Llama: every method, exact resume, accumulation, NaN handling."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raftune.train import TrainConfig, build_models, train


def write_fused(path: Path, n: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"What does f{i} do?", "answer": f"f{i} returns {i} squared.",
                                "original_answer": f"It gives {i}*{i}."}) + "\n")
    return path


def cfg(tmp_path, model, **kw) -> TrainConfig:
    base = dict(data=str(write_fused(tmp_path / "fused.jsonl")), model=str(model), out_dir=str(tmp_path / "runs"),
                batch_size=4, max_steps=2, rollout_max_new_tokens=6, device="cpu", lr=1e-3, top_k=16, save_every=100)
    base.update(kw)
    return TrainConfig(**base)


def write_general(path: Path, n: int = 6) -> Path:
    """General instruction data in Alpaca's format, for replay."""
    path.write_text(json.dumps([{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}."} for i in range(n)]))
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, extra, keys", [
    ("raft", {"lora": True}, {"ce", "kl", "lambda", "ce_over_lambda_kl"}),
    ("raft", {}, {"ce", "kl", "lambda"}),
    ("sft", {"answer_field": "original_answer"}, {"ce"}),
    ("onpolicy", {}, {"ce", "kl", "lambda"}),
    ("distill", {}, {"kl"}),
    ("talr", {}, {"ce", "talr_tau"}),
    ("talr", {"talr_tau": 0.5}, {"ce", "talr_tau"}),
    ("l2sp", {}, {"ce", "l2sp"}),
    ("replay", {"replay_data": "GENERAL"}, {"ce"}),
    ("raft", {"replay_data": "GENERAL", "l2sp_alpha": 0.1}, {"ce", "kl", "lambda", "l2sp"}),
    ("raft", {"kl_lambda": 0.5}, {"ce", "kl", "lambda"}),
    ("raft", {"top_k": None, "kl_direction": "reverse"}, {"ce", "kl"}),
    ("raft", {"teacher_context": "chat", "grad_accum": 2}, {"ce", "kl"}),
])
def test_every_method_trains_and_saves_a_loadable_model(tmp_path, tiny_model_dir, method, extra, keys):
    from transformers import AutoModelForCausalLM

    if extra.get("replay_data") == "GENERAL":
        extra = {**extra, "replay_data": str(write_general(tmp_path / "general.json"))}
    run = train(cfg(tmp_path, tiny_model_dir, method=method, eval_data=str(tmp_path / "fused.jsonl"), eval_limit=4, **extra),
                progress=False)
    rows = [r for r in metrics(run) if "lr" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert keys <= set(r), r
        assert all(r[k] is None or torch.isfinite(torch.tensor(float(r[k]))) for k in keys)
        assert r["rollout_s"] >= 0 and r["tokens_per_s"] > 0
    if "lambda" in keys and extra.get("kl_lambda"):
        assert all(r["lambda"] == 0.5 for r in rows)
    elif method == "onpolicy":  # the paper's on-policy baseline: a fixed lambda of 1
        assert all(r["lambda"] == 1.0 for r in rows)
    elif "talr_tau" in keys and extra.get("talr_tau"):
        assert all(r["talr_tau"] == 0.5 for r in rows)
    elif "lambda" in keys:  # EMA: the first step's lambda is CE / KL exactly (bias correction)
        assert rows[0]["lambda"] == pytest.approx(rows[0]["ce"] / (rows[0]["kl"] + 1e-8), rel=1e-4)  # eps 1e-8
    assert sum("eval_domain_loss" in r for r in metrics(run)) == 2
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged on save
    assert (run / "training_curves.png").exists()


def test_lora_teacher_is_the_base_with_adapters_off(tmp_path, tiny_model_dir):
    c = cfg(tmp_path, tiny_model_dir, lora=True)
    wrapped, teacher, tok = build_models(c, torch.device("cpu"))
    assert teacher is None  # no second copy in memory
    model = wrapped.lm
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)  # adapters now change the output
        ids = torch.tensor([[1, 2, 3, 4]])
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
        ref = original(input_ids=ids).logits
    assert torch.allclose(off, ref, atol=1e-5) and not torch.allclose(on, ref, atol=1e-3)


@pytest.mark.parametrize("extra", [{"lora": True}, {}])
def test_student_trains_in_training_mode_and_the_teacher_in_eval_mode(tmp_path, tiny_model_dir, monkeypatch, extra):
    """Dropout acts in the student's loss forwards and never in the teacher's (with LoRA the teacher is the
    student's own modules with the adapters off, so the mode is switched around its forward)."""
    from raftune import losses

    seen = {"topk": set(), "ce": set(), "kl": set()}
    for what, name in (("topk", "chunked_teacher_topk"), ("ce", "chunked_token_ce"), ("kl", "chunked_topk_kl")):
        real = getattr(losses, name)

        def spy(h, head, *a, real=real, what=what, **k):
            seen[what].add(head.training)
            return real(h, head, *a, **k)

        monkeypatch.setattr(losses, name, spy)
    train(cfg(tmp_path, tiny_model_dir, method="raft", max_steps=1, **extra), progress=False)
    assert seen == {"topk": {False}, "ce": {True}, "kl": {True}}


def test_8x1_equals_2x4(tmp_path, tiny_model_dir):
    """Same data, one optimizer step: batch 8 x accumulation 1 and batch 2 x accumulation 4 give the same weights.
    Greedy rollouts make the trajectories independent of how the batch is split."""
    common = dict(max_steps=1, rollout_temperature=0.0, warmup_ratio=0.0, schedule="constant")
    for method in ("sft", "raft"):
        a = train(cfg(tmp_path, tiny_model_dir, method=method, batch_size=8, grad_accum=1, name=f"{method}-8x1", **common), progress=False)
        b = train(cfg(tmp_path, tiny_model_dir, method=method, batch_size=2, grad_accum=4, name=f"{method}-2x4", **common), progress=False)
        wa, wb = weights(a), weights(b)
        ma, mb = metrics(a)[-1], metrics(b)[-1]
        assert ma["ce"] == pytest.approx(mb["ce"], rel=1e-5)
        if method == "raft":
            assert ma["kl"] == pytest.approx(mb["kl"], rel=1e-4) and ma["lambda"] == pytest.approx(mb["lambda"], rel=1e-4)
        base = load_file(str(tiny_model_dir / "model.safetensors"))
        moved = max(float((wa[k] - base[k]).abs().max()) for k in wa)
        assert moved > 1e-4  # the step did something
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=2e-6), k


@pytest.mark.parametrize("extra", [{}, {"lora": True}])
def test_gradient_checkpointing_recomputes_and_gives_the_same_weights(tmp_path, tiny_model_dir, monkeypatch, extra):
    """With gradient_checkpointing the decoder layers run again in the backward, and the run ends with the
    weights of the same run without it."""
    from raftune import train as train_module

    real, calls = train_module.build_models, {"n": 0}

    def counting(*a, **k):
        student, teacher, tok = real(*a, **k)
        for layer in student.lm.get_decoder().layers:  # counted in forward itself: hooks do not fire in the recompute
            layer.mlp.forward = counted(layer.mlp.forward)
        return student, teacher, tok

    def counted(forward):
        def wrapper(*a, **k):
            calls["n"] += 1
            return forward(*a, **k)
        return wrapper

    monkeypatch.setattr(train_module, "build_models", counting)
    common = dict(method="raft", max_steps=2, rollout_temperature=0.0, **extra)
    counts, runs = {}, {}
    for gc in (False, True):
        calls["n"] = 0
        runs[gc] = train(cfg(tmp_path, tiny_model_dir, gradient_checkpointing=gc, name=f"gc-{gc}", **common), progress=False)
        counts[gc] = calls["n"]
    assert counts[True] > counts[False], counts  # the recomputation happened
    a, b = weights(runs[False]), weights(runs[True])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert metrics(runs[False])[-1]["kl"] == pytest.approx(metrics(runs[True])[-1]["kl"], rel=1e-5)


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, tiny_model_dir, monkeypatch, caplog):
    from raftune import losses

    real = losses.chunked_token_ce
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 1 else out

    monkeypatch.setattr(losses, "chunked_token_ce", flaky)
    run = train(cfg(tmp_path, tiny_model_dir, method="sft", max_steps=2, name="flaky"), progress=False)
    assert "step skipped" in caplog.text
    assert [r["step"] for r in metrics(run) if "lr" in r] == [1, 2]  # the bad step did not count

    monkeypatch.setattr(losses, "chunked_token_ce", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        train(cfg(tmp_path, tiny_model_dir, method="sft", max_steps=5, max_bad_steps=3, name="broken"), progress=False)


def test_reference_truncation_is_counted(tmp_path, tiny_model_dir):
    run = train(cfg(tmp_path, tiny_model_dir, method="raft", max_reference_tokens=2, max_steps=1), progress=False)
    assert metrics(run)[-1]["truncated_references"] == 4  # every reference of the batch was longer


def _cli(tmp_path, model, name, extra=()):
    data = write_fused(tmp_path / "fused.jsonl")
    return [sys.executable, "-m", "raftune", "train", "--data", str(data), "--model", str(model), "--out-dir",
            str(tmp_path / "runs"), "--batch-size", "2", "--max-steps", "8", "--device", "cpu", "--lr", "1e-3",
            "--set", "rollout_max_new_tokens=6", "--set", "top_k=16", "--set", "save_every=2",
            "--set", f"name={name}", *extra]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, tiny_model_dir, sig):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    lora = ["--lora", "--set", "monitor_every=2", "--set", "monitor_limit=8", "--set", "monitor_max_new_tokens=16"]
    straight = subprocess.run(_cli(tmp_path, tiny_model_dir, "straight", lora), env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    cmd = _cli(tmp_path, tiny_model_dir, "interrupted", lora)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run = tmp_path / "runs" / "interrupted"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (run / "checkpoint-2").exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0].decode()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "checkpoint saved" in out, out[-3000:]
    assert not (run / "model").exists()  # it did not finish

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = weights(tmp_path / "runs" / "straight"), weights(run)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [r["step"] for r in metrics(run) if "lr" in r]
    assert steps[-1] == 8 and set(steps) == set(range(1, 9))
    # the monitor of the resumed run logs what the uninterrupted one did (a step logged twice, the same both times)
    drift = {n: [(r["step"], r["drift_kl"]) for r in metrics(tmp_path / "runs" / n) if "drift_kl" in r] for n in ("straight", "interrupted")}
    assert dict(drift["interrupted"]) == dict(drift["straight"]) and sorted(dict(drift["straight"])) == [0, 2, 4, 6, 8]
    assert len(set(drift["interrupted"])) == len(dict(drift["interrupted"]))


FSDP = ["--set", "fsdp=true"]


@pytest.mark.parametrize("method, extra", [("raft", []), ("raft", ["--lora"]), ("sft", []),
                                           ("raft", FSDP), ("raft", ["--lora", *FSDP]), ("sft", FSDP),
                                           ("raft", [*FSDP, "--set", "gradient_checkpointing=true"])])
def test_two_data_parallel_processes_equal_one(tmp_path, tiny_model_dir, method, extra):
    """torchrun with 2 CPU processes (DDP, or FSDP2 with student and teacher sharded, over gloo) x batch 2
    gives the weights of one process x batch 4."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    data = write_fused(tmp_path / "fused.jsonl")
    common = ["train", "--method", method, "--data", str(data), "--model", str(tiny_model_dir), "--out-dir",
              str(tmp_path / "runs"), "--max-steps", "2", "--lr", "1e-3", "--device", "cpu", "--set", "top_k=16",
              "--set", "rollout_max_new_tokens=6", "--set", "rollout_temperature=0", *extra]  # greedy: same rollouts
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "raftune", *common,
                          "--batch-size", "2", "--set", "name=ddp"], env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ("2 processes, FSDP" if FSDP[1] in extra else "2 processes, DDP") in ddp.stderr, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "raftune", *common, "--batch-size", "4", "--set", "name=one"],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = weights(tmp_path / "runs" / "ddp"), weights(tmp_path / "runs" / "one")
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-3  # lr 1e-3: every weight moved about that much
    for k in a:  # the all-reduce sums in another order; Adam's first steps magnify rounding of tiny gradients
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert metrics(tmp_path / "runs" / "ddp")[-1]["ce"] == pytest.approx(metrics(tmp_path / "runs" / "one")[-1]["ce"], rel=1e-5)
    # the forgetting monitor (on by default: before the first step and after the last) agrees across processes
    drift = [{r["step"]: r["drift_kl"] for r in metrics(tmp_path / "runs" / n) if "drift_kl" in r} for n in ("ddp", "one")]
    assert sorted(drift[0]) == [0, 2] and drift[0][0] == drift[1][0] == 0.0
    assert drift[0][2] > 0 and drift[0][2] == pytest.approx(drift[1][2], rel=1e-3)


def test_fsdp_run_stopped_by_sigterm_resumes_on_one_process(tmp_path, tiny_model_dir):
    """SIGTERM to torchrun: both FSDP processes stop after the same step and gather one checkpoint; one
    process resumes it (the format does not depend on the parallelism) and ends with the weights of a
    run that was never interrupted."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    greedy = ["--set", "rollout_temperature=0"]  # the same rollouts whatever the process layout
    straight = subprocess.run(_cli(tmp_path, tiny_model_dir, "straight", [*greedy, "--batch-size", "4"]),
                              env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    cmd = _cli(tmp_path, tiny_model_dir, "sharded", greedy)  # 2 processes x batch 2
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *cmd[1:], *FSDP],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    run = tmp_path / "runs" / "sharded"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (run / "checkpoint-2").exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert "checkpoint saved" in out and not (run / "model").exists(), out[-3000:]
    stopped_at = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert 2 <= stopped_at < 8

    resumed = subprocess.run([*cmd, "--batch-size", "4"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stderr
    a, b = weights(tmp_path / "runs" / "straight"), weights(run)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.parametrize("extra", [{}, {"lora": True}])
def test_bf16_mixed_precision_rollouts_decode_in_bf16(tmp_path, tiny_model_dir, monkeypatch, extra):
    """The trainer's CUDA set-up on the CPU: fp32 master weights, accelerate's bf16 autocast around the
    forward, rollouts through the engine inside it. Its caches are bf16 and the run trains."""
    from raftune.generation import engine as engine_module

    made = []
    real_new_cache = engine_module._new_cache
    monkeypatch.setattr(engine_module, "_new_cache", lambda *a: made.append(real_new_cache(*a)) or made[-1])
    run = train(cfg(tmp_path, tiny_model_dir, method="raft", mixed_precision="bf16", **extra), progress=False)
    assert made and {layer.keys.dtype for c in made for layer in c.layers} == {torch.bfloat16}
    rows = [r for r in metrics(run) if "lr" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor([r["ce"], r["kl"]])).all() for r in rows)
    assert all(r["rollout_tokens"] > 0 for r in rows)
    assert weights(run)  # saved


def test_onpolicy_moves_the_weights_from_the_first_step(tmp_path, tiny_model_dir):
    """At step 1 the student is its teacher, so a KL-only objective has nothing to learn; the on-policy
    baseline has CE on the answers too, and its first step moves every weight matrix."""
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    run = train(cfg(tmp_path, tiny_model_dir, method="onpolicy", max_steps=1, weight_decay=0.0), progress=False)
    row = [r for r in metrics(run) if "lr" in r][0]
    assert row["ce"] > 1.0 and row["kl"] < 1e-3 and row["lambda"] == 1.0
    tuned = weights(run)
    moved = [n for n, p in base.items() if p.ndim == 2 and not torch.equal(tuned[n], p.detach())]
    assert len(moved) == sum(p.ndim == 2 for p in base.values())


def test_a_chat_model_gets_the_chat_teacher_context_by_default(tmp_path, tiny_model_dir):
    from raftune.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.chat_template
    assert cfg(tmp_path, tiny_model_dir, method="raft").resolve(tok).teacher_context == "chat"
    assert cfg(tmp_path, tiny_model_dir, method="raft", teacher_context="appendix_h").resolve(tok).teacher_context == "appendix_h"
    assert cfg(tmp_path, tiny_model_dir, method="onpolicy").resolve(tok).teacher_context == "none"
    tok.chat_template = None
    assert cfg(tmp_path, tiny_model_dir, method="raft").resolve(tok).teacher_context == "appendix_h"
    run = train(cfg(tmp_path, tiny_model_dir, method="raft", max_steps=1), progress=False)
    assert json.loads((run / "config.json").read_text())["resolved"]["teacher_context"] == "chat"


def test_l2sp_keeps_the_weights_closer_to_the_start(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()}

    def distance(run):
        w = weights(run)
        return sum(float((w[n] - p).pow(2).sum()) for n, p in base.items())

    common = dict(max_steps=4, weight_decay=0.0, lr=1e-2)
    sft = train(cfg(tmp_path, tiny_model_dir, method="sft", name="sft", **common), progress=False)
    l2sp = train(cfg(tmp_path, tiny_model_dir, method="l2sp", l2sp_alpha=50.0, name="l2sp", **common), progress=False)
    assert distance(l2sp) < 0.5 * distance(sft)
    rows = [r for r in metrics(l2sp) if "lr" in r]
    assert rows[0]["l2sp"] == 0.0 and rows[-1]["l2sp"] > 0  # alpha ||W - W_0||^2, zero before the first update


def test_replay_mixes_a_share_of_general_data_into_every_batch_in_a_resumable_order(tmp_path):
    from raftune.data import load_qa
    from raftune.train import _replay_examples, _seeded_order

    general = _seeded_order(load_qa(str(write_general(tmp_path / "general.json", n=5)))[0], seed=0)
    assert general == _seeded_order(load_qa(str(tmp_path / "general.json"))[0], seed=0)  # one order per seed
    c = TrainConfig(data="demo", method="replay", replay_data="x", replay_ratio=0.2)
    first = _replay_examples(general, c, 0, 8)
    assert len(first) == 2  # 2 of 10: a share of 0.2 of the CE batch
    seen = [ex.question for m in range(5) for ex in _replay_examples(general, c, m, 8)]
    assert sorted(seen) == sorted([ex.question for ex in general] * 2)  # cycled through the whole set
    assert [ex.question for ex in _replay_examples(general, c, 3, 8)] == seen[6:8]  # a function of the index
    with pytest.raises(ValueError, match="replay_data"):
        TrainConfig(data="demo", method="replay")


def test_distill_learns_toward_another_teacher_model(tmp_path, tiny_model_dir):
    """``teacher_model``: the second phase of SFT-then-distill pulls a tuned model back toward the
    original; with the starting model as its own teacher the first KL is 0."""
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(other)
    from raftune.models import load_tokenizer

    load_tokenizer(str(tiny_model_dir)).save_pretrained(other)
    own = train(cfg(tmp_path, tiny_model_dir, method="distill", max_steps=1, name="own"), progress=False)
    away = train(cfg(tmp_path, tiny_model_dir, method="distill", max_steps=1, name="away", teacher_model=str(other)),
                 progress=False)
    assert [r for r in metrics(own) if "lr" in r][0]["kl"] < 1e-4
    assert [r for r in metrics(away) if "lr" in r][0]["kl"] > 1e-3


def test_a_prompt_that_leaves_no_room_for_an_answer_is_skipped_and_counted(tmp_path, tiny_model_dir):
    data = write_fused(tmp_path / "long.jsonl")
    with open(data, "a") as f:
        f.write(json.dumps({"question": "Why? " * 400, "answer": "Because.", "original_answer": "So."}) + "\n")
    run = train(cfg(tmp_path, tiny_model_dir, method="raft", max_len=128, max_steps=1, data=str(data)), progress=False)
    assert json.loads((run / "config.json").read_text())["skipped_too_long"] == {"train": 1, "eval": 0}
    with open(data, "w") as f:
        f.write(json.dumps({"question": "Why? " * 400, "answer": "Because.", "original_answer": "So."}) + "\n")
    with pytest.raises(ValueError, match="every sample's prompt is longer than max_len=128"):
        train(cfg(tmp_path, tiny_model_dir, method="sft", max_len=128, max_steps=1, name="x", data=str(data)), progress=False)


@pytest.mark.parametrize("method", ["raft", "onpolicy"])
def test_the_teacher_reads_the_reference_field_while_ce_learns_another(tmp_path, tiny_model_dir, monkeypatch, method):
    """CE on the original answers with the fused answer as the teacher's reference (their keys differ:
    a key hashes its answer); a teacher without answer conditioning needs no reference at all."""
    import raftune.train as train_module

    seen = []
    real = train_module.teacher_context_ids

    def spy(tok, context, question, ref, *args, **kw):
        seen.append((context, ref))
        return real(tok, context, question, ref, *args, **kw)

    monkeypatch.setattr(train_module, "teacher_context_ids", spy)
    train(cfg(tmp_path, tiny_model_dir, method=method, answer_field="original_answer", reference_field="answer",
              max_steps=1), progress=False)
    fused = {json.loads(l)["answer"] for l in (tmp_path / "fused.jsonl").read_text().splitlines()}
    assert seen and all(ref in fused for _, ref in seen) if method == "raft" else all(c == "none" for c, _ in seen)
