"""Evaluation: the pure pieces on raw strings, then every suite end to end on the tiny random model."""
import json

import pytest
from conftest import SHARED, shared_data
from typer.testing import CliRunner

from raftune.cli import app
from raftune.evaluate import (
    EvalConfig,
    evaluate,
    majority_vote,
    parse_verdict,
    retention,
    rouge_l,
)


@pytest.mark.parametrize("text, expected", [
    ("Verdict: correct", True),
    ("Verdict: incorrect", False),
    ("Verdict: **Incorrect**", False),
    ("verdict:correct.", True),
    ("Verdict: The answer is not correct.", False),
    ("Yes, it matches the reference.", True),
    ("No.", False),
    ("Correct!", True),
    ("The candidate is wrong about the year.", False),
    ("I think the candidate answer is correct", True),
    ("Verdict:", None),
    ("Verdict: correct, or Verdict: incorrect", None),  # the instruction parroted back
    ("Verdict: correct. Verdict: correct", True),
    ("", None),
    ("Verdict: it says something, the reference says something else", None),
    ("Partly correct, partly wrong", None),  # conflicting words: never guessed
    ("There is no way to tell", None),  # "no" in running text is not a verdict
    ("Score: 7", None),
    ("\u0000\ufffd<|im_end|>", None),
])
def test_parse_verdict_on_raw_replies(text, expected):
    assert parse_verdict(text) is expected


def test_rouge_l_hand_computed():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("dog", "the cat") == 0.0
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5; P = R = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS = "a c" = 2, P = 2/3, R = 2/4, F = 2 * (2/3) * (1/2) / (2/3 + 1/2) = 4/7
    assert rouge_l("a b c", "a c d e") == pytest.approx(4 / 7)
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0 and rouge_l("x", "") == 0.0


def test_majority_vote_rules():
    assert majority_vote([True, True, False]) is True
    assert majority_vote([True, False]) is False  # a tie is incorrect
    assert majority_vote([True, None, None]) is True  # unreadable votes do not count
    assert majority_vote([False, None, True, None]) is False
    assert majority_vote([None, None]) is None and majority_vote([]) is None


def test_retention_ratios():
    got = retention({"ifeval": {"prompt_strict": 0.3}, "mmlu": {"accuracy": 0.5}, "domain": {"d_acc": 0.2}},
                    {"ifeval": {"prompt_strict": 0.4}, "mmlu": {"accuracy": 0.0}, "general": {"mean_score": 5.0}})
    assert got == {"ifeval.prompt_strict": {"score": 0.3, "base": 0.4, "retention": pytest.approx(0.75)},
                   "mmlu.accuracy": {"score": 0.5, "base": 0.0, "retention": None}}


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown suite"):
        EvalConfig(model="default", suites=("domain", "nope"), domain_data="x")
    with pytest.raises(ValueError, match="needs domain_data"):
        EvalConfig(model="default", suites=("domain",))
    with pytest.raises(ValueError, match="local model"):
        EvalConfig(model="http://localhost:1/v1", suites=("weights",))
    assert EvalConfig(model="m", suites="ifeval, mmlu", ifeval_data="a", mmlu_folder="b").suites == ("ifeval", "mmlu")


def test_every_suite_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    ifeval = shared_data("ifeval", "input_data.jsonl")
    mt_bench = shared_data("mt_bench", "question.jsonl")
    mmlu = SHARED / "data" / "mmlu"
    if not mmlu.exists():
        pytest.skip(f"{mmlu} is absent")
    domain = tmp_path / "heldout.jsonl"
    domain.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in [
        ("What does os.getcwd return?", "The current working directory as a string."),
        ("What does len do?", "It returns the number of items in a container."),
        ("What is math.pi?", "The constant pi, about 3.14159."),
    ]))
    tiny = str(tiny_model_dir)
    base = tmp_path / "base_results.json"
    base.write_text(json.dumps({"suites": {"ifeval": {"prompt_strict": 0.5}, "mmlu": {"accuracy": 0.25},
                                           "general": {"mean_score": 4.0}}}))
    cfg = EvalConfig(model=tiny, base_model=tiny, judges=(tiny,), suites=("domain", "ifeval", "mmlu", "general", "drift", "weights"),
                     out_dir=str(tmp_path / "runs"), name="tiny", domain_data=str(domain), ifeval_data=str(ifeval),
                     ifeval_limit=3, mmlu_folder=str(mmlu), mmlu_subjects=("anatomy", "virology"),
                     mmlu_limit_per_subject=2, general_data=str(mt_bench), general_limit=2, max_new_tokens=8,
                     judge_max_new_tokens=6, judge_retries=1, base_results=str(base), device="cpu")
    run = evaluate(cfg, progress=False)
    assert run == tmp_path / "runs" / "eval-tiny"
    results = json.loads((run / "results.json").read_text())
    s = results["suites"]
    assert list(s) == list(cfg.suites) and results["config"]["model"] == tiny

    d = s["domain"]
    assert d["n"] == 3 and d["n_judged"] + d["n_unjudged"] == 3
    assert d["d_acc"] is None if d["n_judged"] == 0 else 0 <= d["d_acc"] <= 1
    assert 0 <= d["rouge_l"] <= 1 and -1 <= d["cosine"] <= 1
    rows = [json.loads(l) for l in (run / "domain.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"answer", "reference", "verdicts", "correct", "rouge_l", "cosine"} <= set(rows[0])
    assert sum(v["correct"] is None for r in rows for v in r["verdicts"]) == d["unreadable_verdicts"]

    assert s["ifeval"]["n_prompts"] == 3 and 0 <= s["ifeval"]["prompt_strict"] <= 1
    assert {"prompt_loose", "instruction_strict", "instruction_loose"} <= set(s["ifeval"])
    assert s["mmlu"]["n"] == 4 and set(s["mmlu"]["per_subject"]) == {"anatomy", "virology"} and s["mmlu"]["form"] == "cloze"
    assert s["general"]["n"] == 2 and s["general"]["n_scored"] + s["general"]["n_unscored"] == 2
    assert s["drift"]["kl_base_to_tuned"] == pytest.approx(0.0, abs=1e-6)
    assert s["weights"]["mean"] == 0.0 and (run / "weight_distance.png").exists()
    for suite in cfg.suites:
        assert (run / f"{suite}.jsonl").read_text().strip()

    ret = results["retention"]
    assert set(ret) >= {"ifeval.prompt_strict", "mmlu.accuracy"}
    assert ret["mmlu.accuracy"]["retention"] == pytest.approx(s["mmlu"]["accuracy"] / 0.25)
    if s["general"]["mean_score"] is not None:
        assert ret["general.mean_score"]["retention"] == pytest.approx(s["general"]["mean_score"] / 4.0)


runner = CliRunner()


def test_cli_refuses_bad_input(tmp_path):
    result = runner.invoke(app, ["eval", "--suite", "ifeval"])
    assert result.exit_code == 2 and "--model is required" in " ".join(result.output.split())
    result = runner.invoke(app, ["eval", "--model", "default", "--suite", "domain,bogus", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown suite" in " ".join(result.output.split()), result.output
    result = runner.invoke(app, ["eval", "--model", "default", "--suite", "domain", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and "needs domain_data" in " ".join(result.output.split()), result.output
    assert not any(tmp_path.iterdir())  # refused before any work
