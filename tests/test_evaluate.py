"""Evaluation: the pure pieces on raw strings, then every suite end to end on the tiny random model."""
import json
import re

import pytest
from conftest import SHARED, shared_data
from typer.testing import CliRunner

from raftune import evaluate as evaluate_module
from raftune.cli import app
from raftune.evaluate import (
    EvalConfig,
    aggregate,
    evaluate,
    majority_vote,
    pairwise_outcome,
    parse_verdict,
    parse_winner,
    retention,
    rouge_l,
)
from raftune.generation import Completion
from raftune.templates import TemplateError


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


@pytest.mark.parametrize("text, expected", [
    ("Winner: A", "A"),
    ("winner: b", "B"),
    ("Winner: tie", "tie"),
    ("**Winner:** Answer B", "B"),
    ("[[A]]", "A"),
    ("The better answer is B, because it names the dose.", "B"),
    ("A. It is more precise.", "A"),
    ("Tie", "tie"),
    (" B", "B"),  # the reply after the "Winner:" prefix
    ("Winner: A, or Winner: B", None),  # the instruction parroted back
    ("Winner: A. Winner: A", "A"),
    ("A is shorter, but B is more accurate", None),  # running text only
    ("Answers A and B are both fine", None),
    ("", None),
    ("Winner: C", None),
    ("A/B testing aside, hard to say", None),
    ("\u0000\ufffd<|im_end|>", None),
])
def test_parse_winner_on_raw_replies(text, expected):
    assert parse_winner(text) == expected


def test_pairwise_outcome_needs_both_orders_to_agree():
    # (value for A with the tuned answer as A, value for A with the tuned answer as B)
    assert pairwise_outcome(1.0, 0.0) == 1.0  # tuned wins in both orders
    assert pairwise_outcome(0.0, 1.0) == 0.0  # base wins in both orders
    assert pairwise_outcome(1.0, 1.0) == 0.5  # always "A": position bias, a tie
    assert pairwise_outcome(0.5, 0.5) == 0.5
    assert pairwise_outcome(1.0, 0.5) == 0.5  # win one way, tie the other: not consistent
    assert pairwise_outcome(None, 0.0) is None and pairwise_outcome(1.0, None) is None


def test_aggregate_mean_and_majority():
    assert aggregate([7.0, 8.0, 3.0], "mean") == pytest.approx(6.0)
    assert aggregate([7.0, 8.0, 3.0], "majority") == 7.0  # the median: two of three at or above it
    assert aggregate([1.0, 1.0, 0.0], "majority") == 1.0  # two judges of three say win
    assert aggregate([1.0, 0.5, 0.0], "majority") == 0.5
    assert aggregate([None, 4.0], "mean") == 4.0 and aggregate([None, None], "mean") is None


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


class RuleJudge:
    """A judge that follows a fixed rule, so that what the aggregation must give is known: it prefers
    the answer that mentions "aspirin" and calls a domain answer correct when it shares a word with the
    reference. It records every prompt it is shown."""

    name = "rule-judge"

    def __init__(self):
        self.seen = []

    def chat(self, conversations, params):
        out = []
        for conv in conversations:
            text = "\n".join(m["content"] for m in conv if m["role"] != "assistant")
            self.seen.append(text)
            if "Answer B:" in text:
                a, b = text.split("Answer A:")[1].split("Answer B:")
                reply = "A" if "aspirin" in a else "B" if "aspirin" in b else "tie"
            else:
                reply = "correct" if "directory" in text.split("Candidate answer:")[-1] else "incorrect"
            out.append(Completion(reply, 10, 1, "stop"))
        return out


def _general_prompts(tmp_path, n=3):
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Question {i}: what helps a headache?"}) + "\n" for i in range(n)))
    return path


def test_pairwise_general_against_the_base_model(tiny_model_dir, tmp_path, monkeypatch):
    """The tuned model is a stand-in that answers "aspirin" to two of three prompts and the base model's
    answer to the third: two wins by the rule judge in both orders, one tie without asking."""
    from raftune.generation import open_generator

    judge = RuleJudge()
    base = open_generator(str(tiny_model_dir), device="cpu")

    class Tuned:
        name = "tuned"

        def chat(self, conversations, params):
            base_out = base.chat(conversations, params)
            return [Completion("Take aspirin.", 5, 3, "stop") if "2:" not in c[-1]["content"] else b
                    for c, b in zip(conversations, base_out)]

    real_open = evaluate_module.open_generator
    monkeypatch.setattr(evaluate_module, "open_generator",
                        lambda spec, **kw: judge if spec == "rule" else Tuned() if spec == "tuned" else real_open(spec, **kw))
    cfg = EvalConfig(model="tuned", base_model=str(tiny_model_dir), judges=("rule", "rule"), suites=("general",),
                     general_mode="pairwise", general_data=str(_general_prompts(tmp_path)), max_new_tokens=6,
                     out_dir=str(tmp_path / "runs"), name="pairwise", device="cpu")
    run = evaluate(cfg, progress=False)
    g = json.loads((run / "results.json").read_text())["suites"]["general"]
    assert (g["wins"], g["ties"], g["losses"], g["identical"]) == (2, 1, 0, 1)
    assert g["win_rate"] == pytest.approx(2.5 / 3) and g["mode"] == "pairwise"
    assert len(judge.seen) == 2 * 2  # 2 differing prompts x both orders; the same judge listed twice is asked once
    rows = [json.loads(l) for l in (run / "general.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rows] == [1.0, 1.0, 0.5] and rows[2]["identical"]


def test_eval_judge_templates_are_editable(tiny_model_dir, tmp_path, monkeypatch):
    judge = RuleJudge()
    real_open = evaluate_module.open_generator
    monkeypatch.setattr(evaluate_module, "open_generator", lambda spec, **kw: judge if spec == "rule" else real_open(spec, **kw))
    domain = tmp_path / "heldout.jsonl"
    domain.write_text(json.dumps({"question": "What does os.getcwd return?", "answer": "The working directory."}) + "\n")
    tpl = tmp_path / "judges.yaml"
    tpl.write_text("domain_judge:\n  user: \"MY GRADER. Q: {question} Ref: {answer} Candidate answer: {candidate}\"\n")
    cfg = EvalConfig(model=str(tiny_model_dir), judges=("rule",), suites=("domain",), domain_data=str(domain),
                     templates=str(tpl), max_new_tokens=4, out_dir=str(tmp_path / "runs"), device="cpu")
    evaluate(cfg, progress=False)
    assert judge.seen and all(t.startswith("MY GRADER. Q: What does os.getcwd return?") for t in judge.seen)
    # a different template is a different evaluation: another run folder
    assert evaluate_module.run_dir_for(cfg) != evaluate_module.run_dir_for(EvalConfig(**{**cfg.__dict__, "templates": None}))
    tpl.write_text("pairwise_judge:\n  user: \"{question} {answer_a}\"\n")
    with pytest.raises(TemplateError, match="lacks placeholder"):
        EvalConfig(model="default", suites=("general",), general_data="x", templates=str(tpl))


def test_a_stopped_evaluation_resumes_without_asking_again(tiny_model_dir, tmp_path, monkeypatch):
    """Stopped inside the general suite's judging: the domain suite is not run again, and the general
    answers already generated come from completions.jsonl."""
    from raftune.generation import open_generator

    model = open_generator(str(tiny_model_dir), device="cpu")
    calls = []

    class Counting:  # the tiny model, counting the conversations it is asked to complete
        name = model.name
        batch_size = 2

        def chat(self, conversations, params):
            calls.extend(conversations)
            return model.chat(conversations, params)

    judge = RuleJudge()

    class Failing(RuleJudge):
        def chat(self, conversations, params):
            if any("Rate the answer" in m["content"] for c in conversations for m in c):
                raise KeyboardInterrupt  # stopped while judging the general answers
            return judge.chat(conversations, params)

    real_open = evaluate_module.open_generator
    current = {"judge": Failing()}
    monkeypatch.setattr(evaluate_module, "open_generator",
                        lambda spec, **kw: current["judge"] if spec == "rule" else Counting() if spec == "tiny" else real_open(spec, **kw))
    domain = tmp_path / "heldout.jsonl"
    domain.write_text("".join(json.dumps({"question": f"What does f{i} return?", "answer": "A directory."}) + "\n"
                              for i in range(3)))
    cfg = EvalConfig(model="tiny", judges=("rule",), suites=("domain", "general"), domain_data=str(domain),
                     general_data=str(_general_prompts(tmp_path)), max_new_tokens=5, out_dir=str(tmp_path / "runs"),
                     name="resume", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, progress=False)
    run = tmp_path / "runs" / "eval-resume"
    partial = json.loads((run / "results.json").read_text())
    assert partial["complete"] is False and list(partial["suites"]) == ["domain"]
    assert len(calls) == 3 + 3  # domain answers, then general answers, logged before the judges ran
    domain_rows = (run / "domain.jsonl").read_text()

    current["judge"] = judge
    calls.clear()
    evaluate(cfg, progress=False)
    assert calls == []  # nothing asked of the model again
    done = json.loads((run / "results.json").read_text())
    assert done["complete"] is True and list(done["suites"]) == ["domain", "general"]
    assert done["suites"]["domain"] == partial["suites"]["domain"] and (run / "domain.jsonl").read_text() == domain_rows
    assert done["suites"]["general"]["n_scored"] == 0  # the rule judge gives no 1-10 score: counted, not guessed

    # other settings in the same folder: computed again, not mixed
    evaluate(EvalConfig(**{**cfg.__dict__, "max_new_tokens": 6}), progress=False)
    assert len(calls) == 6


def test_base_answers_come_from_the_base_evaluation(tiny_model_dir, tmp_path, monkeypatch):
    """The base model's evaluation answers the general prompts; a tuned model's evaluation against it
    (drift, and the general suite in pairwise mode) takes the base answers from there: the base model is
    asked nothing, and the drift suite scores exactly those answers."""
    from raftune.generation import open_generator

    real_open = evaluate_module.open_generator
    asked = {}

    class Counting:  # the tiny model under a spec name, counting the conversations it completes
        def __init__(self, spec):
            self.inner, self.spec = open_generator(str(tiny_model_dir), device="cpu"), spec
            self.name = spec

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

        def chat(self, conversations, params):
            asked[self.spec] = asked.get(self.spec, 0) + len(conversations)
            return self.inner.chat(conversations, params)

    monkeypatch.setattr(evaluate_module, "open_generator",
                        lambda spec, **kw: RuleJudge() if spec == "rule" else Counting(spec) if spec in ("base", "tuned")
                        else real_open(spec, **kw))
    common = dict(judges=("rule",), general_data=str(_general_prompts(tmp_path)), max_new_tokens=5, base_model="base",
                  out_dir=str(tmp_path / "runs"), device="cpu")
    base_run = evaluate(EvalConfig(model="base", suites=("general", "drift"), name="base", **common), progress=False)
    assert asked == {"base": 3}  # its general answers; the drift suite's base answers are the same, logged
    asked.clear()
    base_log = (base_run / "completions.jsonl").read_text()
    tuned_run = evaluate(EvalConfig(model="tuned", suites=("general", "drift"), name="tuned", general_mode="pairwise",
                                    base_results=str(base_run / "results.json"), **common), progress=False)
    assert asked == {"tuned": 3}
    base_answers = [json.loads(line)["answer"] for line in (base_run / "general.jsonl").read_text().splitlines()]
    drift_rows = [json.loads(line) for line in (tuned_run / "drift.jsonl").read_text().splitlines()]
    pairwise_rows = [json.loads(line) for line in (tuned_run / "general.jsonl").read_text().splitlines()]
    assert [r["base_answer"] for r in drift_rows] == base_answers == [r["base_answer"] for r in pairwise_rows]
    assert (base_run / "completions.jsonl").read_text() == base_log  # read by the tuned evaluation, never written


# --- failed server calls: never an answer, retried by the next run ---------------------------------------


def _eval_reply(prompt: str) -> str:
    """The fake server as the model under evaluation and as its judge."""
    if "Is the candidate answer correct" in prompt:  # domain_judge
        return "Verdict: correct"
    if "Rate the answer below" in prompt:  # general_judge
        return "Score: 7"
    return "My answer to: " + prompt.splitlines()[-1]


@pytest.mark.parametrize("failure", ["5xx", "html", "no-choices", "null-content"])
def test_failed_server_calls_are_not_scored_and_a_rerun_retries_exactly_them(tmp_path, fake_chat_server, failure):
    """The model and the judge are the fake server. In the domain suite, the answer to the flaky_answer
    question and the judge call on the flaky_judge question's answer fail after their retries: the suite
    is not scored, the general suite is, the run raises, and results.json says what failed. Fixed, the
    same config asks exactly those three requests and completes with every answer scored."""
    from raftune.generation import GenerationFailed

    server = fake_chat_server
    server.reply, server.failure = _eval_reply, failure
    server.fail = lambda p: ("flaky_answer" in p and "Candidate answer" not in p) or \
        ("flaky_judge" in p and "Is the candidate answer correct" in p)
    domain = tmp_path / "heldout.jsonl"
    domain.write_text("".join(json.dumps({"question": f"What does {n} return?", "answer": "A directory."}) + "\n"
                              for n in ["f0", "flaky_answer_f1", "flaky_judge_f2", "f3"]))
    cfg = EvalConfig(model=server.spec, judges=(server.spec,), suites=("domain", "general"), domain_data=str(domain),
                     general_data=str(_general_prompts(tmp_path, n=2)), max_new_tokens=16, judge_retries=1,
                     out_dir=str(tmp_path / "runs"), name="flaky", device="cpu")

    with pytest.raises(GenerationFailed, match=r"eval: 2 samples of suite\(s\) domain \(2\) failed.*Run the same command"):
        evaluate(cfg, progress=False)
    run = tmp_path / "runs" / "eval-flaky"
    assert len(server.requests) == 4 + 1 + 3 + 1 + 2 + 2  # domain answers + a retry, judges + a retry, general
    results = json.loads((run / "results.json").read_text())
    assert results["complete"] is False and list(results["suites"]) == ["general"]
    assert results["suites"]["general"]["n_scored"] == 2 and results["suites"]["general"]["mean_score"] == 7.0
    failed = results["failed"]["domain"]
    assert failed["n_failed"] == 2 and [len(s["errors"]) for s in failed["samples"]] == [1, 1]
    errors = sorted(s["errors"][0] for s in failed["samples"])
    assert errors[0].startswith("answer: POST") and errors[1].startswith(f"judge {server.spec}: POST")
    assert not (run / "domain.jsonl").exists()  # nothing scored on a failure
    logged = [json.loads(line)["completion"] for line in (run / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 3 + 2 + 2 + 2 and all(c["error"] is None and c["text"] for c in logged)

    server.fail = lambda p: False  # fixed
    server.requests.clear()
    evaluate(cfg, progress=False)
    assert sorted(("judge " if "Candidate answer" in p else "answer ") + re.search(r"f\d", p).group(0)
                  for p in server.requests) == ["answer f1", "judge f1", "judge f2"]
    results = json.loads((run / "results.json").read_text())
    assert results["complete"] is True and "failed" not in results and list(results["suites"]) == ["domain", "general"]
    d = results["suites"]["domain"]
    assert (d["n"], d["n_judged"], d["d_acc"]) == (4, 4, 1.0)
    rows = [json.loads(line) for line in (run / "domain.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [f"My answer to: What does {n} return?"
                                           for n in ["f0", "flaky_answer_f1", "flaky_judge_f2", "f3"]]


def test_a_failed_judge_call_is_neither_a_verdict_nor_unreadable(tmp_path, tiny_model_dir, monkeypatch):
    """Pairwise general suite with a judge whose calls on one prompt fail: that prompt fails the suite
    (no tie, no loss recorded); the model's and the base model's answers stay logged."""
    from raftune.generation import GenerationFailed

    class FailingJudge(RuleJudge):
        def chat(self, conversations, params):
            out = super().chat(conversations, params)
            return [Completion("", 0, 0, "error", "HTTP 503") if "Question 1:" in "\n".join(m["content"] for m in c)
                    else o for c, o in zip(conversations, out)]

    class Tuned:
        name = "tuned"

        def chat(self, conversations, params):
            return [Completion("Take aspirin.", 5, 3, "stop") for _ in conversations]

    real_open = evaluate_module.open_generator
    monkeypatch.setattr(evaluate_module, "open_generator",
                        lambda spec, **kw: FailingJudge() if spec == "rule" else Tuned() if spec == "tuned" else real_open(spec, **kw))
    cfg = EvalConfig(model="tuned", base_model=str(tiny_model_dir), judges=("rule",), suites=("general",),
                     general_mode="pairwise", general_data=str(_general_prompts(tmp_path)), max_new_tokens=6,
                     out_dir=str(tmp_path / "runs"), name="pairwise-fail", device="cpu")
    with pytest.raises(GenerationFailed, match=r"general \(1\)") as e:
        evaluate(cfg, progress=False)
    assert e.value.failed["general"]["samples"] == [{"sample": 1, "errors": ["judge rule-judge: HTTP 503", "judge rule-judge: HTTP 503"]}]
    results = json.loads((e.value.run_dir / "results.json").read_text())
    assert results["suites"] == {} and results["complete"] is False
    assert len((e.value.run_dir / "completions.jsonl").read_text().splitlines()) == 3 + 3 + 2 * 2  # answers, base, judges


def test_truncated_prompts_count_this_evaluation_once_per_backend(tiny_model_dir, tmp_path):
    """A prompt longer than the context is cut (the length guard); results.json counts the cuts of this
    evaluation only, once even where the judge is the model itself, and not those of an earlier one."""
    import dataclasses

    from raftune.generation import open_generator

    data = tmp_path / "domain.jsonl"
    data.write_text(json.dumps({"question": "Why? " * 3000, "answer": "Because."}) + "\n"
                    + json.dumps({"question": "Short?", "answer": "Yes."}) + "\n")
    cfg = EvalConfig(model=str(tiny_model_dir), judges=(str(tiny_model_dir),), suites=("domain",), domain_data=str(data),
                     out_dir=str(tmp_path / "runs"), name="first", max_new_tokens=4, judge_max_new_tokens=4,
                     judge_retries=0, device="cpu")
    shared = open_generator(str(tiny_model_dir), batch_size=cfg.batch_size, device="cpu")  # what evaluate opens
    counts = []
    for c in (cfg, dataclasses.replace(cfg, name="second")):
        before = shared.truncated_prompts
        run = evaluate(c, progress=False)
        counts.append(json.loads((run / "results.json").read_text())["truncated_prompts"])
        assert counts[-1] == shared.truncated_prompts - before >= 1
    assert counts[0] == counts[1]
