"""MMLU: loading the hendrycks CSVs, the prompts, and scoring on models whose answers are known."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raftune.data import DataError
from raftune.mmlu import (
    MMLUQuestion,
    cloze_prompt,
    continuation_logprobs,
    few_shot_examples,
    letter_prompt,
    load_mmlu,
    mmlu_subjects,
    next_token_logprobs,
    score_mmlu,
)

SHARED_MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu"


@pytest.fixture(scope="module")
def tok():
    from raftune.models import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tok):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def write(folder: Path, split: str, subject: str, text: str) -> Path:
    path = folder / split / f"{subject}_{split}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def q(question="What is 1 + 1?", choices=("1", "2", "3", "4"), answer=1, subject="elementary_mathematics"):
    return MMLUQuestion(subject, question, tuple(choices), answer)


# --- loading ---------------------------------------------------------------------------------------

def test_load_reads_rows_multiline_questions_and_limits(tmp_path):
    write(tmp_path, "test", "college_physics",
          'Plain?,a,b,c,d,A\n"Two\nlines, quoted?",e,"f, g",h,i,D\n\nThird?,j,k,l,m,C\n')
    write(tmp_path, "test", "anatomy", "Bone?,w,x,y,z,B\n")
    got = load_mmlu(tmp_path)
    assert mmlu_subjects(tmp_path) == ["anatomy", "college_physics"]
    assert got == [
        MMLUQuestion("anatomy", "Bone?", ("w", "x", "y", "z"), 1),
        MMLUQuestion("college_physics", "Plain?", ("a", "b", "c", "d"), 0),
        MMLUQuestion("college_physics", "Two\nlines, quoted?", ("e", "f, g", "h", "i"), 3),
        MMLUQuestion("college_physics", "Third?", ("j", "k", "l", "m"), 2),
    ]
    limited = load_mmlu(tmp_path, subjects=["college_physics", "anatomy"], limit_per_subject=1)
    assert [(x.subject, x.question) for x in limited] == [("college_physics", "Plain?"), ("anatomy", "Bone?")]


@pytest.mark.parametrize("rows, line, field, message", [
    # the bad record comes after a record spanning lines 1-2 and a blank line 3: its first line is 4
    ("Q?,a,b,c,d,E\n", 4, "answer", "'E' is not one of A, B, C, D"),
    ("Q?,a,b,c,d\n", 4, "answer", "missing: the row has 5 values, expected 6 (question, A, B, C, D, answer)"),
    ("Q?,a,b\n", 4, "C", "missing: the row has 3 values, expected 6 (question, A, B, C, D, answer)"),
    ("Q?,a,b,c,d,A,extra\n", 4, None, "7 values, expected 6 (question, A, B, C, D, answer)"),
    (" ,a,b,c,d,A\n", 4, "question", "empty"),
    ("Q?,a,,c,d,A\n", 4, "B", "empty choice"),
    ('"Multi\nline?",a,b,c,d,a\n', 4, "answer", "'a' is not one of A, B, C, D"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, rows, line, field, message):
    path = write(tmp_path, "val", "virology", '"Good\nrow?",a,b,c,d,A\n\n' + rows)
    with pytest.raises(DataError) as e:
        load_mmlu(tmp_path, "val")
    assert (e.value.path, e.value.line, e.value.field, e.value.message) == (str(path), line, field, message)
    where = f"{path}:{line}:" + ("" if field is None else f" field '{field}':")
    assert str(e.value) == f"{where} {message}"


def test_missing_folder_subject_and_split_are_errors(tmp_path):
    write(tmp_path, "test", "anatomy", "Bone?,w,x,y,z,B\n")
    with pytest.raises(DataError, match="no such folder"):
        load_mmlu(tmp_path, "dev")
    with pytest.raises(DataError, match="no file for 'astrology'; there are 1: anatomy"):
        load_mmlu(tmp_path, subjects=["astrology"])
    with pytest.raises(ValueError, match="split must be one of dev, val, test"):
        load_mmlu(tmp_path, "train")
    path = write(tmp_path, "val", "anatomy", 'Q?,a,b,c,d,A\n"unclosed,a,b,c,d,A\nQ?,a,b,c,d,A\n')
    with pytest.raises(DataError, match="malformed CSV") as e:
        load_mmlu(tmp_path, "val")
    assert (e.value.path, e.value.line) == (str(path), 2)  # where the unclosed quote opens


def test_few_shot_examples_are_the_first_k_dev_rows(tmp_path):
    write(tmp_path, "dev", "anatomy", "One?,a,b,c,d,A\nTwo?,a,b,c,d,B\nThree?,a,b,c,d,C\n")
    assert [x.question for x in few_shot_examples(tmp_path, "anatomy", 2)] == ["One?", "Two?"]
    assert few_shot_examples(tmp_path, "anatomy", 0) == []
    with pytest.raises(DataError, match="5 shots asked for, but the dev split has only 3"):
        few_shot_examples(tmp_path, "anatomy", 5)


# --- prompts ---------------------------------------------------------------------------------------

SHOTS = [q("Shot one?", ("w", "x", "y", "z"), 2), q("Shot two?", ("p", "q", "r", "s"), 0)]


def test_letter_prompt_is_the_original_harness_format():
    assert letter_prompt(q(), SHOTS) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "Shot one?\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\n"
        "Shot two?\nA. p\nB. q\nC. r\nD. s\nAnswer: A\n\n"
        "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert letter_prompt(q()) == ("The following are multiple choice questions (with answers) about "
                                  "elementary mathematics.\n\nWhat is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")


def test_prompts_strip_the_question_as_lm_eval_does():
    # hendrycks rows such as nutrition's end their question with a newline: no blank line before "A."
    loose, shots = q(" What is 1 + 1?\n"), [q("Shot one?\n", ("w", "x", "y", "z"), 2)]
    assert letter_prompt(loose, shots) == letter_prompt(q(), [SHOTS[0]])
    assert "?\nA. 1" in letter_prompt(loose) and cloze_prompt(loose, shots) == cloze_prompt(q(), [SHOTS[0]])
    assert q("x", ("  a ", "b", "c", "d")).choices[0] in letter_prompt(q("x", ("  a ", "b", "c", "d")))  # choices as they are


def test_cloze_prompt_answers_shots_with_the_correct_text():
    assert cloze_prompt(q(), SHOTS) == (
        "Question: Shot one?\nAnswer: y\n\nQuestion: Shot two?\nAnswer: p\n\nQuestion: What is 1 + 1?\nAnswer:"
    )
    assert cloze_prompt(q()) == "Question: What is 1 + 1?\nAnswer:"


# --- scoring on a model whose answer is known ------------------------------------------------------

class BiasLM(torch.nn.Module):
    """Ignores its input: every position's logits are ``bias``, so log p(token) = log_softmax(bias)[token]."""

    def __init__(self, bias_V: torch.Tensor):
        super().__init__()
        self.bias_V = torch.nn.Parameter(bias_V.clone())

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.bias_V.expand(*input_ids.shape, -1))  # (B, T, V)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_letter_form_picks_the_letter_the_model_prefers(tok):
    bias_V = torch.zeros(len(tok))
    bias_V[ids(tok, " C")] = 5.0
    bias_V[ids(tok, " A")] = 2.0
    questions = [q(answer=2), q(answer=0, subject="anatomy"), q(answer=2, subject="anatomy")]
    res = score_mmlu(BiasLM(bias_V), tok, questions, form="letter", batch_size=2)
    logp_V = torch.log_softmax(bias_V, -1)
    expected_scores = [logp_V[ids(tok, " " + x)[0]].item() for x in "ABCD"]
    assert res["accuracy"] == pytest.approx(2 / 3) and res["n"] == 3
    assert res["per_subject"] == {"elementary_mathematics": {"accuracy": 1.0, "n": 1},
                                  "anatomy": {"accuracy": 0.5, "n": 2}}
    assert [{k: r[k] for k in ("subject", "answer", "predicted", "correct")} for r in res["per_question"]] == [
        {"subject": "elementary_mathematics", "answer": 2, "predicted": 2, "correct": True},
        {"subject": "anatomy", "answer": 0, "predicted": 2, "correct": False},
        {"subject": "anatomy", "answer": 2, "predicted": 2, "correct": True},
    ]
    for r in res["per_question"]:
        assert r["scores"] == pytest.approx(expected_scores, abs=1e-6)


def test_chat_letter_form_scores_the_letter_without_a_space(tok):
    bias_V = torch.zeros(len(tok))
    bias_V[ids(tok, " B")] = 9.0  # a plain-text " B" would win, but a chat reply opens with "D"
    bias_V[ids(tok, "D")] = 5.0
    res = score_mmlu(BiasLM(bias_V), tok, [q(answer=3)], form="letter", chat=True)
    assert res["per_question"][0]["predicted"] == 3 and res["accuracy"] == 1.0 and res["chat"] is True
    assert score_mmlu(BiasLM(bias_V), tok, [q(answer=3)], form="letter")["per_question"][0]["predicted"] == 1


def test_cloze_form_picks_the_choice_with_the_best_per_token_mean(tok):
    choices = ("red", "light green", "blue", "yellow")
    bias_V = torch.zeros(len(tok))
    bias_V[ids(tok, " blue")] = 6.0
    bias_V[ids(tok, " light")] = 8.0  # a higher first token, but " green" drags its mean down
    questions = [q("Sky?", choices, 2), q("Grass?", choices, 1)]
    res = score_mmlu(BiasLM(bias_V), tok, questions, form="cloze", batch_size=3)
    logp_V = torch.log_softmax(bias_V, -1)
    expected = [logp_V[ids(tok, " " + c)].mean().item() for c in choices]
    assert len(ids(tok, " light green")) == 2 and max(range(4), key=lambda j: expected[j]) == 2
    assert [r["predicted"] for r in res["per_question"]] == [2, 2]
    assert [r["correct"] for r in res["per_question"]] == [True, False] and res["accuracy"] == 0.5
    for r in res["per_question"]:
        assert r["scores"] == pytest.approx(expected, abs=1e-6)


def test_letters_of_several_tokens_are_scored_by_their_sum(tok, monkeypatch):
    from raftune import mmlu

    space = ids(tok, " ")
    plain = mmlu._plain_ids
    def two_token_letters(t, text):  # " B" -> [" ", "B"], as a tokenizer without a " B" token would give
        return space + plain(t, text.strip()) if text.strip() in mmlu.LETTERS else plain(t, text)

    monkeypatch.setattr(mmlu, "_plain_ids", two_token_letters)
    bias_V = torch.zeros(len(tok))
    bias_V[ids(tok, "B")] = 4.0
    res = score_mmlu(BiasLM(bias_V), tok, [q(answer=1)], form="letter")
    logp_V = torch.log_softmax(bias_V, -1)
    expected = [(logp_V[space[0]] + logp_V[ids(tok, x)[0]]).item() for x in "ABCD"]
    assert res["per_question"][0]["scores"] == pytest.approx(expected, abs=1e-6) and res["accuracy"] == 1.0


def test_ties_go_to_the_earliest_choice(tok):
    res = score_mmlu(BiasLM(torch.zeros(len(tok))), tok, [q(answer=0)], form="letter")
    assert res["per_question"][0]["predicted"] == 0


def test_bad_arguments(tok):
    model = BiasLM(torch.zeros(len(tok)))
    with pytest.raises(ValueError, match="form must be one of letter, cloze"):
        score_mmlu(model, tok, [q()], form="mc")
    with pytest.raises(ValueError, match="shots > 0 needs folder"):
        score_mmlu(model, tok, [q()], shots=5)
    with pytest.raises(ValueError, match="no questions"):
        score_mmlu(model, tok, [])


# --- the arithmetic and the batching, on a tiny random Llama ---------------------------------------

def test_cloze_scores_equal_a_manual_log_softmax(tiny, tok):
    question = q("Which planet is largest?", ("Jupiter", "the planet Mars", "Earth", "a small moon of Saturn"), 0)
    res = score_mmlu(tiny, tok, [question], form="cloze")
    prompt = tok("Question: Which planet is largest?\nAnswer:")["input_ids"]
    for choice, score in zip(question.choices, res["per_question"][0]["scores"]):
        cont = ids(tok, " " + choice)
        with torch.no_grad():
            logits_TV = tiny(torch.tensor([prompt + cont])).logits[0]
        logp_TV = torch.log_softmax(logits_TV.double(), -1)
        total = sum(logp_TV[len(prompt) + j - 1, t].item() for j, t in enumerate(cont))
        assert score == pytest.approx(total / len(cont), abs=1e-5)


def test_letter_scores_equal_a_manual_next_token_log_softmax(tiny, tok):
    res = score_mmlu(tiny, tok, [q()], form="letter")
    prompt = tok(letter_prompt(q()))["input_ids"]
    with torch.no_grad():
        logp_V = torch.log_softmax(tiny(torch.tensor([prompt])).logits[0, -1].double(), -1)
    assert res["per_question"][0]["scores"] == pytest.approx([logp_V[ids(tok, " " + x)[0]].item() for x in "ABCD"],
                                                             abs=1e-5)


def test_batched_scoring_equals_one_at_a_time(tiny, tok):
    questions = [q("Short?", ("a", "bb bb", "c", "the longest choice of them all"), 1),
                 q("A much longer question, with many more tokens in it than the others have?",
                   ("x", "y", "z", "w"), 3),
                 q("Medium length question here?", ("one", "two", "three", "four"), 0, subject="anatomy")]
    for form in ("letter", "cloze"):
        one = score_mmlu(tiny, tok, questions, form=form, batch_size=1)
        many = score_mmlu(tiny, tok, questions, form=form, batch_size=5)
        for a, b in zip(one["per_question"], many["per_question"]):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
            assert a["predicted"] == b["predicted"]


def test_letter_fast_path_equals_pair_scoring(tiny, tok):
    prompts = [tok(letter_prompt(x))["input_ids"] for x in (q(), q("Another one?"))]
    letters = [ids(tok, " " + x) for x in "ABCD"]
    fast_NK = next_token_logprobs(tiny, prompts, [x[0] for x in letters], batch_size=2)
    pairs = continuation_logprobs(tiny, [(p, c) for p in prompts for c in letters], batch_size=3)
    assert all(n == 1 for _, n in pairs)
    assert fast_NK.flatten().tolist() == pytest.approx([s for s, _ in pairs], abs=1e-5)


def test_scoring_restores_the_training_flag(tiny, tok):
    tiny.train()
    score_mmlu(tiny, tok, [q()], form="cloze")
    assert tiny.training
    tiny.eval()


def test_chat_prompt_goes_into_the_user_turn(tiny, tok):
    from raftune.sequences import chat_prompt_ids

    res = score_mmlu(tiny, tok, [q()], form="cloze", chat=True)
    prompt = chat_prompt_ids(tok, cloze_prompt(q()))
    assert tok.decode(prompt).endswith("Question: What is 1 + 1?\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    cont = ids(tok, "2")  # no leading space: the reply opens the assistant's turn
    with torch.no_grad():
        logp_TV = torch.log_softmax(tiny(torch.tensor([prompt + cont])).logits[0].double(), -1)
    expected = sum(logp_TV[len(prompt) + j - 1, t].item() for j, t in enumerate(cont)) / len(cont)
    assert res["per_question"][0]["scores"][1] == pytest.approx(expected, abs=1e-5)


# --- the real data ---------------------------------------------------------------------------------

def test_smoke_on_the_shared_mmlu_folder(tiny, tok):
    if not SHARED_MMLU.exists():
        pytest.skip(f"{SHARED_MMLU} is absent: this test reads the project's shared MMLU data")
    assert len(mmlu_subjects(SHARED_MMLU)) == 57
    questions = load_mmlu(SHARED_MMLU, "test", subjects=["anatomy", "high_school_biology"], limit_per_subject=3)
    assert len(questions) == 6 and all(len(x.choices) == 4 and 0 <= x.answer <= 3 for x in questions)
    for form in ("letter", "cloze"):
        res = score_mmlu(tiny, tok, questions, shots=2, form=form, folder=SHARED_MMLU, batch_size=4)
        assert res["n"] == 6 and 0.0 <= res["accuracy"] <= 1.0
        assert res["per_subject"].keys() == {"anatomy", "high_school_biology"}
        assert all(r["predicted"] == max(range(4), key=lambda j: r["scores"][j]) for r in res["per_question"])
