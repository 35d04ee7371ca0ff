"""The fast GPU path on a GPU: compiled decoding (inductor, CUDA graphs) against eager, and RAFT steps
with compiled rollouts under bf16 autocast.

    RAFTUNE_GPU_MODEL=/tmp/smol python -m pytest -q -m gpu tests/test_gpu.py    # where a GPU is lent

Marked ``gpu`` and skipped without CUDA (the CI machine has none). The model is the embedded
SmolLM2-135M-Instruct (``default``), or the folder ``RAFTUNE_GPU_MODEL`` names (the device has no
embedded weights: ../shared/gpu/README.md carries them to /tmp/smol). The checks themselves are
functions of a device and a compile setting, so that the last test here runs them on the CPU
(dynamo + AOT autograd on the tiny model) and shows their set-up works where no GPU is lent.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from raftune.generation.engine import DecodeEngine
from raftune.models import load_model_and_tokenizer

MODEL = os.environ.get("RAFTUNE_GPU_MODEL", "default")
QUESTIONS = ["What are the symptoms of anemia?", "Hi", "How is type 2 diabetes treated, and what should a patient eat?",
             "Name three rivers.", "Why is the sky blue?", "What does the liver do?", "Explain photosynthesis briefly.",
             "What is a vaccine?"]
NEAR_TIE_NATS = 0.25  # bf16 logits of magnitude ~20 are resolved to ~0.1: two kernels may order a closer pair either way

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with `pytest -m gpu` where one is lent)")


def chat_ids(tok, questions):
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for q in questions]


def check_compiled_equals_eager_greedy(model, tok, n: int, compile: str, backend: str = "inductor") -> DecodeEngine:
    """Greedy decoding with the compiled step against the eager engine, same model and dtype.

    The rule: every row is equal token for token, or, at the first position where a row differs, the
    two tokens are a near-tie of the eager model there: their log-probs (a plain forward on the prompt
    and the common prefix, softmax in fp32) differ by at most NEAR_TIE_NATS. Positions after a
    divergence are not compared (each continuation follows its own prefix). At least half the rows
    must be equal throughout, and the compiled engine must really have compiled (no fallback)."""
    eos = {tok.eos_token_id}
    prompts = chat_ids(tok, QUESTIONS)
    eager = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="off").generate(prompts, n)
    engine = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile=compile, backend=backend)
    compiled = engine.generate(prompts, n)
    assert engine.compile_fallback is None, engine.compile_fallback
    assert engine.stats["compiled_shapes"], "the engine did not compile"
    device = next(model.parameters()).device
    equal_rows = 0
    for i, p in enumerate(prompts):
        a, b = eager.tokens_BN[i].tolist(), compiled.tokens_BN[i].tolist()
        if a == b:
            equal_rows += 1
            continue
        t = next(j for j in range(n) if a[j] != b[j])
        ids = torch.tensor([p + a[:t]], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
        gap = abs(float(logp[a[t]] - logp[b[t]]))
        assert gap <= NEAR_TIE_NATS, f"row {i}, token {t}: eager {a[t]} vs compiled {b[t]}, {gap:.3f} nats apart"
    assert equal_rows >= len(prompts) / 2, f"only {equal_rows} of {len(prompts)} rows equal"
    return engine


def write_fused(path: Path, n: int = 12) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": f"A short answer about {q.lower().rstrip('?.')}."}) + "\n"
                            for q in (QUESTIONS * 2)[:n]))
    return path


def check_three_raft_steps(tmp_path: Path, model: str, device: str, lora: bool, rollout_compile: str,
                           rollout_tokens: int = 32) -> Path:
    """Three RAFT steps, fp32 master weights under bf16 autocast, rollouts compiled: finite CE and KL
    every step, rollouts that produced tokens, and no fallback recorded (the rollouts were compiled)."""
    from raftune.train import TrainConfig, train

    run = train(TrainConfig(data=str(write_fused(tmp_path / "fused.jsonl")), model=model, out_dir=str(tmp_path / "runs"),
                            method="raft", lora=lora, batch_size=4, max_steps=3, rollout_max_new_tokens=rollout_tokens, max_len=256,
                            device=device, mixed_precision="bf16", rollout_compile=rollout_compile, save_every=100),
                progress=False)
    config = json.loads((run / "config.json").read_text())
    assert "rollout_compile_fallback" not in config, config.get("rollout_compile_fallback")
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["ce"]) and math.isfinite(r["kl"]) and math.isfinite(r["lambda"]), r
        assert r["rollout_tokens"] > 0
    return run


@pytest.fixture(scope="module")
def bf16_model():
    return load_model_and_tokenizer(MODEL, device="cuda", dtype="bf16")


@pytest.mark.gpu
@cuda
def test_compiled_decoding_equals_eager_greedy_in_bf16(bf16_model):
    """inductor with CUDA graphs (``auto`` on CUDA: mode reduce-overhead) against eager, bf16 weights."""
    model, tok = bf16_model
    check_compiled_equals_eager_greedy(model, tok, 64, "auto")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_three_raft_steps_with_compiled_rollouts_under_bf16_autocast(tmp_path, lora):
    check_three_raft_steps(tmp_path, MODEL, "cuda", lora, "auto")


def test_the_gpu_checks_run_on_the_cpu(tiny_model_dir, tmp_path):
    """The same checks on the CPU and the tiny model, so that a lent GPU's few minutes are not spent on a
    broken test: the greedy rule with dynamo + AOT autograd in place of inductor, and the RAFT steps
    with eager rollouts (with ``rollout_compile: default`` inductor's CPU compile makes this a
    4-minute test on two cores; run once, it passed: docs/benchmarks.md)."""
    import torch._dynamo

    torch._dynamo.reset()
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", dtype="bf16")
    check_compiled_equals_eager_greedy(model, tok, 16, "default", backend="aot_eager")
    check_three_raft_steps(tmp_path, str(tiny_model_dir), "cpu", lora=True, rollout_compile="off", rollout_tokens=6)
