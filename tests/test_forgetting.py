"""Forgetting measures: drift (KL and perplexity on base answers) and weight distance."""
from __future__ import annotations

import copy
import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raftune.data import DataError
from raftune.forgetting import (
    base_answers,
    drift,
    load_general_prompts,
    plot_weight_distance,
    weight_distance,
)
from raftune.models import load_model_and_tokenizer
from raftune.sequences import chat_prompt_ids, end_of_turn_id

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

PROMPTS = ["What is a list comprehension?", "Name three prime numbers.", "Say hi.", "Explain recursion briefly."]
ANSWERS = ["It builds a list from an iterable in one expression.", "2, 3 and 5.", "", "A function that calls itself."]


@pytest.fixture(scope="module")
def base_tok(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", dtype="fp32")
    return model.eval(), tok


@pytest.fixture(scope="module")
def perturbed(base_tok):
    model = copy.deepcopy(base_tok[0])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    return model


# --- drift -------------------------------------------------------------------------------------------

def test_identical_models_give_zero_kl_and_equal_perplexities(base_tok):
    model, tok = base_tok
    r = drift(model, copy.deepcopy(model), tok, PROMPTS, ANSWERS, batch_size=2, chunk=5)
    assert r["kl_base_to_tuned"] == pytest.approx(0.0, abs=1e-9)
    assert r["tuned_perplexity"] == pytest.approx(r["base_perplexity"], rel=1e-9)
    assert r["n_tokens"] == sum(p["n_tokens"] for p in r["per_prompt"])
    assert len(r["per_prompt"]) == len(PROMPTS)
    assert r["per_prompt"][2]["n_tokens"] == 1  # an empty answer is its end-of-turn token


def _naive(model, tuned, tok, prompt: str, answer: str):
    """Per-token KL(base || tuned), tuned NLL and base NLL from full-sequence logits, one sample."""
    p = chat_prompt_ids(tok, prompt)
    a = tok(answer, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tok, model.generation_config)]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        zb, zt = model(ids).logits[0], tuned(ids).logits[0]  # (T, V)
    pos = slice(len(p) - 1, len(p) + len(a) - 1)  # positions that predict the answer tokens
    logp_b, logp_t = F.log_softmax(zb[pos].double(), -1), F.log_softmax(zt[pos].double(), -1)
    kl = F.kl_div(logp_t, logp_b, log_target=True, reduction="none").sum(-1)  # KL(base || tuned) per token
    target = torch.tensor(a)
    return kl, F.nll_loss(logp_t, target, reduction="none"), F.nll_loss(logp_b, target, reduction="none")


def test_perturbed_copy_matches_naive_full_sequence_kl_and_perplexity(base_tok, perturbed):
    model, tok = base_tok
    r = drift(model, perturbed, tok, PROMPTS[:1], ANSWERS[:1], chunk=4)
    kl, nll_t, nll_b = _naive(model, perturbed, tok, PROMPTS[0], ANSWERS[0])
    assert r["n_tokens"] == len(kl)
    assert r["kl_base_to_tuned"] > 1e-3
    assert r["kl_base_to_tuned"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert r["tuned_perplexity"] == pytest.approx(math.exp(float(nll_t.mean())), rel=1e-5)
    assert r["base_perplexity"] == pytest.approx(math.exp(float(nll_b.mean())), rel=1e-5)
    assert r["tuned_perplexity"] != pytest.approx(r["base_perplexity"], rel=1e-3)


def test_totals_are_means_over_all_answer_tokens(base_tok, perturbed):
    model, tok = base_tok
    r = drift(model, perturbed, tok, PROMPTS, ANSWERS, batch_size=4)
    naive = [_naive(model, perturbed, tok, q, a) for q, a in zip(PROMPTS, ANSWERS)]
    kl = torch.cat([n[0] for n in naive])
    nll_t = torch.cat([n[1] for n in naive])
    assert r["n_tokens"] == len(kl)
    assert r["kl_base_to_tuned"] == pytest.approx(float(kl.mean()), rel=1e-3, abs=2e-6)
    assert r["tuned_perplexity"] == pytest.approx(math.exp(float(nll_t.mean())), rel=1e-5)
    for row, (k, _, nb) in zip(r["per_prompt"], naive):
        assert row["kl"] == pytest.approx(float(k.mean()), rel=1e-3, abs=2e-6)  # fp32 logits of a near-uniform model
        assert row["base_nll"] == pytest.approx(float(nb.mean()), rel=1e-5)


def test_batch_size_and_chunk_do_not_change_the_values(base_tok, perturbed):
    model, tok = base_tok
    one = drift(model, perturbed, tok, PROMPTS, ANSWERS, batch_size=1, chunk=128)
    three = drift(model, perturbed, tok, PROMPTS, ANSWERS, batch_size=3, chunk=3)
    assert one["n_tokens"] == three["n_tokens"]
    assert one["kl_base_to_tuned"] == pytest.approx(three["kl_base_to_tuned"], rel=1e-3, abs=2e-6)
    for key in ("tuned_perplexity", "base_perplexity"):
        assert one[key] == pytest.approx(three[key], rel=1e-5)
    for a, b in zip(one["per_prompt"], three["per_prompt"]):
        assert a["n_tokens"] == b["n_tokens"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=2e-6)


def test_the_monitor_s_path_gives_the_drift_suite_s_kl(base_tok, perturbed):
    """``drift_per_prompt`` is the one computation of both: without the NLLs (the monitor's call) the KL is
    the same, and only answer positions are scored (an answer's count is its tokens plus end-of-turn)."""
    from raftune.forgetting import drift_per_prompt, model_scorer, token_mean

    model, tok = base_tok
    eot = end_of_turn_id(tok, model.generation_config)
    suite = drift(model, perturbed, tok, PROMPTS, ANSWERS, batch_size=3, chunk=4)
    rows = drift_per_prompt(model_scorer(model), model_scorer(perturbed.eval()), tok, eot, PROMPTS, ANSWERS,
                            batch_size=3, chunk=4, nll=False)
    assert token_mean(rows, "kl") == suite["kl_base_to_tuned"] and "tuned_nll" not in rows[0]
    assert [r["n_tokens"] for r in rows] == [len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in ANSWERS]


def test_drift_restores_training_mode_and_checks_its_inputs(base_tok, perturbed):
    model, tok = base_tok
    perturbed.train()
    drift(model, perturbed, tok, PROMPTS[:1], ANSWERS[:1])
    assert perturbed.training and not model.training
    perturbed.eval()
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        drift(model, perturbed, tok, PROMPTS[:2], ANSWERS[:1])
    with pytest.raises(ValueError, match="no prompts"):
        drift(model, perturbed, tok, [], [])


def test_base_answers_are_greedy_and_feed_drift(base_tok):
    model, tok = base_tok
    answers = base_answers(model, tok, PROMPTS[:3], max_new_tokens=6, batch_size=2)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert base_answers(model, tok, PROMPTS[:3], max_new_tokens=6, batch_size=3) == answers
    r = drift(model, copy.deepcopy(model), tok, PROMPTS[:3], answers)
    assert r["kl_base_to_tuned"] == pytest.approx(0.0, abs=1e-9)


# --- weight distance -----------------------------------------------------------------------------

def test_known_distances_on_state_dicts():
    gen = torch.Generator().manual_seed(0)
    w0 = {"a": torch.randn(4, 5, generator=gen, dtype=torch.float64), "b": torch.randn(7, generator=gen, dtype=torch.float64)}
    r = weight_distance(w0, {k: 1.1 * v for k, v in w0.items()})
    assert r["n_tensors"] == 2
    assert r["per_tensor"] == {"a": pytest.approx(0.1, abs=1e-12), "b": pytest.approx(0.1, abs=1e-12)}
    assert r["mean"] == pytest.approx(0.1, abs=1e-12)
    # different distances, one zero-norm base tensor skipped, an integer buffer skipped
    base = {"a": torch.ones(3, 4), "b": torch.full((2,), 2.0), "z": torch.zeros(5), "step": torch.tensor([3])}
    tuned = {"a": torch.ones(3, 4) * 1.5, "b": torch.tensor([2.0, 2.0]), "z": torch.ones(5), "step": torch.tensor([4])}
    r = weight_distance(base, tuned)
    assert r["per_tensor"] == {"a": pytest.approx(0.5), "b": 0.0}
    assert r["mean"] == pytest.approx(0.25)
    assert r["skipped_zero_norm"] == ["z"] and r["skipped_non_float"] == ["step"]


def test_tied_weights_count_once():
    emb = torch.randn(10, 4)
    base = {"embed.weight": emb, "head.weight": emb, "norm.weight": torch.ones(4)}
    tuned_emb = emb * 1.2
    tuned = {"embed.weight": tuned_emb, "head.weight": tuned_emb, "norm.weight": torch.ones(4) * 1.1}
    r = weight_distance(base, tuned)
    assert set(r["per_tensor"]) == {"embed.weight", "norm.weight"}
    assert r["per_tensor"]["embed.weight"] == pytest.approx(0.2, rel=1e-6)
    # a side that stores the tied copy once (as save_pretrained does) still matches
    r2 = weight_distance(base, {"embed.weight": tuned_emb, "norm.weight": torch.ones(4) * 1.1})
    assert r2["per_tensor"] == r["per_tensor"]
    # a tuned model that unties the head compares it with the shared base tensor
    r3 = weight_distance(base, {"embed.weight": tuned_emb, "head.weight": emb * 1.3, "norm.weight": torch.ones(4)})
    assert r3["per_tensor"]["head.weight"] == pytest.approx(0.3, rel=1e-6) and r3["n_tensors"] == 3


def test_mismatched_tensors_are_named():
    base = {"a": torch.ones(3, 4), "b": torch.ones(2)}
    with pytest.raises(ValueError, match=r"differ in shape.*a \(3, 4\) vs \(4, 3\)"):
        weight_distance(base, {"a": torch.ones(4, 3), "b": torch.ones(2)})
    with pytest.raises(ValueError, match=r"only in base b, only in tuned c"):
        weight_distance(base, {"a": torch.ones(3, 4), "c": torch.ones(2)})


def test_saved_folders_module_and_plot(tmp_path, base_tok, perturbed):
    model, _ = base_tok
    model.save_pretrained(tmp_path / "base")
    perturbed.save_pretrained(tmp_path / "tuned")
    from_folders = weight_distance(tmp_path / "base", str(tmp_path / "tuned"))
    from_modules = weight_distance(model, perturbed)
    assert from_folders["n_tensors"] == from_modules["n_tensors"] > 5
    assert from_folders["per_tensor"] == pytest.approx(from_modules["per_tensor"], rel=1e-9)
    assert 0 < from_folders["mean"] < 1
    assert weight_distance(tmp_path / "base", model)["mean"] == 0.0  # folder against module, tied head included
    png = plot_weight_distance(from_folders, tmp_path / "plots" / "wd.png", title="perturbed")
    assert png.is_file() and png.stat().st_size > 1000
    with pytest.raises(ValueError, match="no .safetensors"):
        weight_distance(tmp_path / "plots", model)


# --- general prompts -----------------------------------------------------------------------------

def _shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test reads the project's shared evaluation data")
    return path


def test_loads_the_three_real_formats():
    mt = load_general_prompts(_shared("mt_bench", "question.jsonl"))
    assert len(mt) == 80 and mt[0].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
    alpaca = load_general_prompts(_shared("alpaca_eval", "alpaca_eval.jsonl"))
    assert len(alpaca) == 805
    assert alpaca[0] == "What are the names of some famous actors that started their careers on Broadway?"
    path = _shared("self_instruct", "user_oriented_instructions.jsonl")
    si = load_general_prompts(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(si) == len(rows) == 252
    assert si[0] == rows[0]["instruction"] + "\n\n" + rows[0]["instances"][0]["input"]
    no_input = next(i for i, r in enumerate(rows) if not r["instances"][0]["input"].strip())
    assert si[no_input] == rows[no_input]["instruction"].strip()
    assert load_general_prompts(path, limit=5) == si[:5]


def test_small_files_gz_and_json(tmp_path):
    rows = [{"turns": ["first", "second"]}, {"instruction": "do it"},
            {"instruction": "fix", "instances": [{"input": "  text  ", "output": "x"}]},
            {"instruction": "plain", "instances": [{"input": "", "output": "y"}]}]
    want = ["first", "do it", "fix\n\ntext", "plain"]
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    (tmp_path / "p.jsonl").write_text(text)
    assert load_general_prompts(tmp_path / "p.jsonl") == want
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    assert load_general_prompts(tmp_path / "p.jsonl.gz") == want
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert load_general_prompts(tmp_path / "p.json", limit=2) == want[:2]


@pytest.mark.parametrize("bad, line, field, message", [
    ('{"question": "q"}', 3, "instruction", "missing"),
    ('{"turns": []}', 3, "turns", "an empty list"),
    ('{"turns": [5]}', 3, "turns[0]", "expected a string, got a number"),
    ('{"instruction": "  "}', 3, "instruction", "empty"),
    ('{"instruction": "i", "instances": [{"input": 3}]}', 3, "instances[0].input", "got a number"),
    ('["a list"]', 3, None, "expected an object, got a list"),
    ('{"instruction": ', 3, None, "malformed JSON"),
])
def test_bad_rows_name_their_line(tmp_path, bad, line, field, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "ok"}\n\n' + bad + '\n{"instruction": "after"}\n')  # line 2 is blank
    with pytest.raises(DataError) as e:
        load_general_prompts(path)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), line, field)
    assert message in e.value.message


def test_bad_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        load_general_prompts(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_general_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("instruction\nx\n")
    with pytest.raises(DataError, match="expected a .jsonl or .json"):
        load_general_prompts(tmp_path / "p.csv")
