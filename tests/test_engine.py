"""The decode engine: equal to ``generate`` when greedy, reproducible when sampling, its KV cache in the
compute dtype, and its compiled decode step reused across batches of a bucket."""
import json
import logging

import pytest
import torch

from raftune.generation import engine as engine_module
from raftune.generation.engine import DecodeEngine, end_mask, pick_tokens
from raftune.models import load_model_and_tokenizer

QUESTIONS = ["Hi", "A much longer question that needs many more tokens than the first one, does it not?",
             "Why is the sky blue?", "Name three rivers."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model_and_tokenizer(str(tiny_model_dir), device="cpu")


def chat_ids(tok, questions):
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for q in questions]


def hf_greedy(model, prompts, n, pad_id, eos_ids):
    """``model.generate``'s greedy continuation of each prompt (left padded, as every batched caller does)."""
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad_id)
    attn = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], attn[i, P - len(p):] = torch.tensor(p), 1
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False, pad_token_id=pad_id,
                         eos_token_id=sorted(eos_ids))[:, P:]
    return torch.cat([out, torch.full((len(prompts), n - out.shape[1]), pad_id)], dim=1)  # (B, n)


def assert_greedy_equals_generate(model, tok, n):
    prompts = chat_ids(tok, QUESTIONS)
    eos = {tok.eos_token_id}
    free = hf_greedy(model, prompts, n, tok.pad_token_id, eos)
    # an end token that the model does produce mid-answer, so that rows stop early, at different steps
    stop = next(int(t) for t in free[1, 2:] if int(t) not in eos)
    eos = {tok.eos_token_id, stop}
    ref = hf_greedy(model, prompts, n, tok.pad_token_id, eos)
    out = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="off").generate(prompts, n)
    assert out.tokens_BN.tolist() == ref.tolist()
    assert out.stopped_B[1]  # row 1 ended on `stop`, and is padded after it
    assert out.mask_BN.tolist() == end_mask(ref, eos).tolist()
    first = int(out.mask_BN[1].sum())
    assert int(out.tokens_BN[1, first - 1]) in eos and (out.tokens_BN[1, first:] == tok.pad_token_id).all()
    return out


def test_greedy_equals_generate_token_for_token_on_the_tiny_model(tiny):
    model, tok = tiny
    assert_greedy_equals_generate(model, tok, 24)


@pytest.mark.slow
def test_greedy_equals_generate_token_for_token_on_the_embedded_model():
    model, tok = load_model_and_tokenizer("default", device="cpu", dtype="fp32")
    out = assert_greedy_equals_generate(model, tok, 40)
    assert int(out.lengths_B.min()) >= 1


def test_the_cache_is_allocated_by_the_engine_in_the_compute_dtype(tiny_model_dir):
    """fp32 master weights decoding under bf16 autocast (the trainer on CUDA): the engine's cache is bf16
    before any forward has run, and decoding works (the crash of transformers' own static cache)."""
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", dtype="fp32")
    model.train()
    engine = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids={tok.eos_token_id}, compile="off")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert engine.compute_dtype(torch.device("cpu")) == torch.bfloat16
        cache = engine._cache(2, 16, engine.compute_dtype(torch.device("cpu")), torch.device("cpu"))
        assert {layer.keys.dtype for layer in cache.layers} == {torch.bfloat16}  # allocated, nothing run yet
        torch.manual_seed(0)
        out = engine.generate(chat_ids(tok, QUESTIONS[:2]), 12, temperature=1.0)
    assert next(model.parameters()).dtype == torch.float32 and model.training  # weights and mode untouched
    caches = list(engine._caches.values())
    assert {layer.keys.dtype for c in caches for layer in c.layers} == {torch.bfloat16}
    assert {layer.values.dtype for c in caches for layer in c.layers} == {torch.bfloat16}
    assert out.tokens_BN.shape == (2, 12) and int(out.mask_BN.sum()) >= 2
    assert engine.compute_dtype(torch.device("cpu")) == torch.float32  # outside autocast: the weights' dtype


def test_seeded_sampling_repeats_and_seeds_differ(tiny):
    model, tok = tiny
    engine = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids={tok.eos_token_id}, compile="off")
    prompts = chat_ids(tok, QUESTIONS)

    def draw(seed):
        torch.manual_seed(seed)
        return engine.generate(prompts, 16, temperature=1.0, top_p=0.95).tokens_BN

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_compiled_step_equals_eager_and_is_reused_within_a_bucket(tiny):
    """The compiled decode step (dynamo + AOT autograd on the CPU; inductor and CUDA graphs on a GPU)
    gives the eager tokens; a second batch of the same bucket, with other prompts and fewer rows, runs
    the graph already compiled; a longer cache is a new bucket and compiles once."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, tok = tiny
    torch._dynamo.reset()
    counters.clear()
    eos = {tok.eos_token_id}
    eager = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="off")
    compiled = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="default", backend="aot_eager")
    prompts = chat_ids(tok, QUESTIONS)
    first = compiled.generate(prompts, 16, batch_bucket=4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and first.tokens_BN.tolist() == eager.generate(prompts, 16).tokens_BN.tolist()

    second = compiled.generate(prompts[2:], 16, batch_bucket=4)  # 2 rows padded to 4, another prompt length
    assert counters["stats"]["unique_graphs"] == graphs  # no new compilation
    assert second.tokens_BN.tolist() == eager.generate(prompts[2:], 16).tokens_BN.tolist()
    assert compiled.stats["compiled_shapes"] == {(4, 256, "torch.float32", False, False)}

    compiled.generate(prompts[:1], 300, batch_bucket=4)  # prompt + 300 > 256: the 512 bucket
    assert counters["stats"]["unique_graphs"] == graphs + 1
    torch.manual_seed(5)
    a = compiled.generate(prompts, 16, temperature=1.0, batch_bucket=4).tokens_BN
    torch.manual_seed(5)
    assert torch.equal(a, compiled.generate(prompts, 16, temperature=1.0, batch_bucket=4).tokens_BN)


NO_TRITON = "Cannot find a working triton installation. Either the package is not installed or it is too old."


def no_triton(gm, example_inputs):
    """A compile backend that fails as inductor does on a machine without a working Triton."""
    raise RuntimeError(NO_TRITON)


def fallback_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "raftune.generation.engine" and "decoding eagerly" in r.getMessage()]


def test_a_failing_compile_decodes_eagerly_with_the_same_tokens_and_warns_once(tiny, monkeypatch, caplog):
    """The compile backend raises at the step's first call: the failed step runs again eagerly (the eager
    engine's tokens, no step lost or doubled), every later call decodes eagerly, and the process logs
    one warning with the cause, however many engines fail."""
    import torch._dynamo

    model, tok = tiny
    torch._dynamo.reset()
    monkeypatch.setattr(engine_module, "_fallback_warned", False)  # once per process: start this test's process afresh
    eos = {tok.eos_token_id}
    prompts = chat_ids(tok, QUESTIONS)
    eager = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="off")
    ref = eager.generate(prompts, 16)
    failing = [DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="default", backend=no_triton)
               for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="raftune.generation.engine"):
        outs = [e.generate(prompts, 16, batch_bucket=4) for e in failing]
        later = failing[0].generate(prompts[2:], 16, batch_bucket=4)
    for out, engine in zip(outs, failing):
        assert out.tokens_BN.tolist() == ref.tokens_BN.tolist() and out.mask_BN.tolist() == ref.mask_BN.tolist()
        assert engine.compile_fallback == f"BackendCompilerFailed: RuntimeError: {NO_TRITON}"
        assert not engine.compiling(torch.device("cpu"))
    assert failing[1].stats["decode_steps"] == eager.stats["decode_steps"]  # the failed step counted once
    assert later.tokens_BN.tolist() == eager.generate(prompts[2:], 16).tokens_BN.tolist()
    (warning,) = fallback_warnings(caplog)
    assert f"RuntimeError: {NO_TRITON}" in warning and "\n" not in warning


def test_a_training_run_whose_rollouts_fail_to_compile_finishes_and_records_why(tiny_model_dir, tmp_path, monkeypatch):
    """RAFT with ``rollout_compile: default`` (inductor), inductor made to fail by its own testing switch
    (an error at its first compile, as a broken Triton gives on CUDA): the run trains to its end,
    eagerly, and its config.json and the metrics of its first step say why."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from raftune.train import TrainConfig, train

    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config, "_raise_error_for_testing", True)
    data = tmp_path / "fused.jsonl"
    data.write_text("".join(json.dumps({"question": f"What does f{i} do?", "answer": f"f{i} returns {i} squared."}) + "\n"
                            for i in range(8)))
    run = train(TrainConfig(data=str(data), model=str(tiny_model_dir), out_dir=str(tmp_path / "runs"), method="raft",
                            batch_size=4, max_steps=2, rollout_max_new_tokens=6, device="cpu", lr=1e-3, top_k=16,
                            rollout_compile="default"), progress=False)
    why = json.loads((run / "config.json").read_text())["rollout_compile_fallback"]
    assert why == "BackendCompilerFailed: AssertionError", why
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "lr" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor([r["ce"], r["kl"]])).all() for r in rows)
    assert rows[0]["rollout_compile_fallback"] == why and "rollout_compile_fallback" not in rows[1]
    assert (run / "model" / "model.safetensors").exists()


def test_an_evaluation_records_the_fallback_of_its_local_models(tiny_model_dir, tmp_path, monkeypatch):
    """results.json names the local models whose compiled decoding failed, with why."""
    from raftune.evaluate import EvalConfig, evaluate
    from raftune.generation import open_generator

    data = tmp_path / "domain.jsonl"
    data.write_text(json.dumps({"question": "Why is the sky blue?", "answer": "Rayleigh scattering."}) + "\n")
    cfg = EvalConfig(model=str(tiny_model_dir), judges=(str(tiny_model_dir),), suites=("domain",), domain_data=str(data),
                     out_dir=str(tmp_path / "runs"), max_new_tokens=4, judge_max_new_tokens=4, judge_retries=0,
                     device="cpu")
    shared = open_generator(str(tiny_model_dir), batch_size=cfg.batch_size, device="cpu")  # what evaluate opens
    monkeypatch.setattr(shared, "engine", DecodeEngine(shared.model, pad_id=shared.tokenizer.pad_token_id,
                                                       eos_ids=shared.eos_ids, compile="default", backend=no_triton))
    results = json.loads((evaluate(cfg, progress=False) / "results.json").read_text())
    assert results["compile_fallback"] == {str(tiny_model_dir): f"BackendCompilerFailed: RuntimeError: {NO_TRITON}"}
    assert results["complete"]


def test_pick_tokens_greedy_and_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    assert pick_tokens(logits, 0.0, 1.0).tolist() == [0, 2]
    torch.manual_seed(0)
    draws = torch.stack([pick_tokens(logits, 1.0, 0.6) for _ in range(4000)])  # (4000, 2)
    # row 0: the nucleus is {0, 1} (0.5 < 0.6 <= 0.8), renormalised to 0.625 / 0.375; row 1: {2} alone
    assert set(draws[:, 0].tolist()) == {0, 1} and (draws[:, 1] == 2).all()
    assert abs(float((draws[:, 0] == 0).float().mean()) - 0.625) < 0.03
    full = torch.stack([pick_tokens(logits, 1.0, 1.0) for _ in range(4000)])
    freq = torch.bincount(full[:, 0], minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_end_mask_keeps_the_first_end_token():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [9, 9, 9, 3]])
    assert end_mask(tokens, {2, 3}).tolist() == [[True, True, False, False], [True] * 4, [True] * 4]
