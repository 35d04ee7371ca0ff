"""The decode engine: equal to ``generate`` when greedy, reproducible when sampling, its KV cache in the
compute dtype, and its compiled decode step reused across batches of a bucket."""
import json
import logging

import pytest
import torch

from raftune.generation import engine as engine_module
from raftune.generation.engine import DecodeEngine, end_mask, first_stop_is_final, pick_tokens
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


# --- stop strings ----------------------------------------------------------------------------------------

CONTEXTS = ["The capital of France is", "List three fruits:", "Once upon a time", "Question: what is 2+2?\nAnswer:"]
NEVER = "\x00never produced"


@pytest.fixture(scope="module")
def varied(tiny_model_dir):
    """The tiny model with larger random weights: its greedy text varies from token to token (the default
    init repeats one token), partial UTF-8 characters included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raftune.models import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir, initializer_range=0.3)).eval()
    return model, load_tokenizer(str(tiny_model_dir))


def cut(text: str, stops) -> str:
    """The text before its first stop string (lm-eval's cut)."""
    return text[:min((text.find(s) for s in stops if s and s in text), default=len(text))]


def texts(gen, tok) -> list[str]:
    return [tok.decode(row[:n]) for row, n in zip(gen.tokens_BN.tolist(), gen.lengths_B.tolist())]


def spanning_stops(gen, tok, starts) -> list[str]:
    """For row i, a 4-character stop string across the boundary of two of its tokens, at its first
    occurrence in the row's text, at or after token ``starts[i]``: rows stop at different steps."""
    stops = []
    for i, start in enumerate(starts):
        row = gen.tokens_BN[i].tolist()
        full = tok.decode(row)
        for j in range(start, len(row) - 1):
            head = tok.decode(row[:j + 1])
            k = len(head)
            if full.startswith(head) and "\ufffd" not in full[k - 2:k + 2] and full.find(full[k - 2:k + 2]) == k - 2 \
                    and len(tok.decode(row[j:j + 1])) >= 2 and len(tok.decode(row[j + 1:j + 2])) >= 2:
                stops.append(full[k - 2:k + 2])
                break
    assert len(stops) == len(starts)
    return stops


def test_stop_strings_end_rows_early_and_the_cut_text_is_unchanged(varied):
    """Greedy rows stopped on stop strings (each spanning two tokens, met at different steps, one inside a
    longer one) give, cut at the first stop string, the text of decoding to the end cut there, with fewer
    decode steps; the rows are marked stopped, their mask covers what they made and pads follow; a stop
    string never produced changes nothing. The same with the host checking only every 4 steps (CUDA's)."""
    model, tok = varied
    prompts = [tok.encode(c) for c in CONTEXTS]
    eos = {tok.eos_token_id}
    engine = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="off")
    N = 48
    free = engine.generate(prompts, N)
    free_steps = engine.stats["decode_steps"]
    assert not free.stopped_B.any()  # the random model never ends a row: every stop below is a stop string's
    stops = spanning_stops(free, tok, [2, 10, 18, 26])
    # a longer stop string that begins before row 0's and ends tokens later: the text is cut at it, which a
    # row stopped as soon as its first stop string shows would miss
    row0 = tok.decode(free.tokens_BN[0].tolist())
    at = row0.find(stops[0])
    longer = row0[at - 2:at + len(stops[0]) + 8]
    stops += [longer, NEVER]
    assert cut(texts(free, tok)[0], stops) == row0[:at - 2]

    for sync_every in (None, 4):
        engine = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="off", sync_every=sync_every)
        gen = engine.generate(prompts, N, stop=stops, decode=tok.decode)
        assert [cut(t, stops) for t in texts(gen, tok)] == [cut(t, stops) for t in texts(free, tok)]
        assert all(cut(t, stops) != t for t in texts(gen, tok))  # every row holds a stop string
        assert engine.stats["decode_steps"] < free_steps - 8
        assert gen.stopped_B.all() and gen.on_stop_B.all()
        made = gen.mask_BN.sum(dim=1)
        assert gen.lengths_B.tolist() == made.tolist() and len(set(made.tolist())) == len(prompts)
        assert int(made.max()) - 1 == engine.stats["decode_steps"]  # the loop ends with the last row's stop
        for row, ref, n in zip(gen.tokens_BN, free.tokens_BN, made.tolist()):
            assert torch.equal(row[:n], ref[:n]) and (row[n:] == tok.pad_token_id).all()

    engine = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="off")
    never = engine.generate(prompts, N, stop=[NEVER, ""], decode=tok.decode)  # "" is no stop string (lm-eval's seq2seq eos)
    assert torch.equal(never.tokens_BN, free.tokens_BN) and torch.equal(never.mask_BN, free.mask_BN)
    assert not never.stopped_B.any() and not never.on_stop_B.any() and engine.stats["decode_steps"] == free_steps
    with pytest.raises(ValueError, match="stop strings need decode"):
        engine.generate(prompts, N, stop=stops)


def test_stop_strings_on_the_compiled_step(varied):
    """The compiled step (as in the test above: dynamo + AOT autograd on the CPU), a bucket of 8 rows for 4
    prompts: the host marks rows done between calls of the compiled step, and the cut texts are the eager ones."""
    import torch._dynamo

    model, tok = varied
    torch._dynamo.reset()
    prompts = [tok.encode(c) for c in CONTEXTS]
    eos = {tok.eos_token_id}
    eager = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="off")
    free = eager.generate(prompts, 40)
    stops = spanning_stops(free, tok, [2, 8, 14, 20])
    compiled = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, compile="default", backend="aot_eager")
    gen = compiled.generate(prompts, 40, batch_bucket=8, stop=stops, decode=tok.decode)
    assert compiled.compile_fallback is None and compiled.stats["compiled_shapes"]
    assert [cut(t, stops) for t in texts(gen, tok)] == [cut(t, stops) for t in texts(free, tok)]
    assert gen.on_stop_B.all() and compiled.stats["decode_steps"] < eager.stats["decode_steps"]


def test_a_stop_string_is_final_once_no_continuation_can_move_it():
    """The first occurrence counts once the text runs the longest stop string plus the lookahead past it:
    before that, a longer stop string begun earlier could still complete (cutting sooner), and a trailing
    U+FFFD (a character whose bytes are not all made) is no text yet."""
    look = engine_module.STOP_LOOKAHEAD
    assert not first_stop_is_final("no stop here at all", ["Question:"])
    assert not first_stop_is_final("a Question:" + "x" * (look - 1), ["Question:"])
    assert first_stop_is_final("a Question:" + "x" * look, ["Question:"])
    stops = ["ab", "xaby"]
    assert cut("xab", stops) == "x" and cut("xaby", stops) == ""  # why "ab" alone cannot end "xab" yet
    assert not first_stop_is_final("xab" + "z" * (look + 1), stops)
    assert first_stop_is_final("xab" + "z" * (look + 2), stops)  # "xaby" can no longer start before "ab"
    assert not first_stop_is_final("Q:" + "ab" + "\ufffd" * 4, ["Q:"]) and first_stop_is_final("Q:abcd", ["Q:"])
    assert first_stop_is_final("abcdefgh", ["", "a"]) and not first_stop_is_final("abcdefgh", [""])
