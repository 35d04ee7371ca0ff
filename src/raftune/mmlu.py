"""MMLU (Hendrycks et al., 2021) scored by log-likelihood, in the letter and the cloze form.

    from raftune.mmlu import load_mmlu, score_mmlu
    questions = load_mmlu("../shared/data/mmlu", "test", subjects=["anatomy"], limit_per_subject=20)
    result = score_mmlu(model, tokenizer, questions, form="cloze", shots=5, folder="../shared/data/mmlu")
    print(result["accuracy"], result["per_subject"])

Data: the original hendrycks layout, ``{folder}/{split}/{subject}_{split}.csv`` for split ``dev``,
``val`` or ``test``; each CSV has no header and six values a row: question, A, B, C, D, answer letter.
Few-shot examples are the first k rows of the subject's ``dev`` split, as in the original harness.
A question enters a prompt stripped of the whitespace around it, as in lm-evaluation-harness's
``mmlu`` tasks: 963 test questions of the hendrycks files start with a space (648) or end with a
newline (306, all of ``nutrition``: a blank line before "A.") or a space, which the original harness
pastes in (docs/lm-eval-agreement.md).

Forms (``predicted`` is the argmax of the four scores; a tie goes to the earliest choice):
- ``letter``: the original MMLU prompt, which lists the choices, scored by the log-probability of
  the answer letter (" A" .. " D") as the next token. Small models sit near chance here.
- ``cloze``: "Question: {q}\\nAnswer:" without the choices, each choice's continuation " {text}"
  scored by its summed log-probability divided by its number of tokens (per-token normalisation;
  not per character or byte, as lm-eval's ``acc_norm`` does). The usual form for small models.
Both are accuracies over questions (micro average); ``per_subject`` gives each subject's own.

Tokenization: the prompt is tokenized as a whole (with the tokenizer's special tokens, e.g. a BOS
where the model expects one), the continuation separately WITHOUT special tokens, and the two id
lists are concatenated. The continuation carries the leading space, so in byte-level BPE " A" is
the single token a model sees after "Answer:" in running text; the prompt's last token never merges
with the continuation. The letter form reads the letter's one token at the prompt's last position;
where a tokenizer makes the letter several tokens (legacy SentencePiece prepends a space marker of
its own), it scores their summed log-probability instead.

``chat=True`` puts the whole prompt (shots included) into one user turn of the tokenizer's chat
template with the generation prompt; the continuation then opens the assistant's reply, which
starts without a space: "A" and "{text}". The default is plain text, as the original harness runs
base models.

Batching: every (prompt, continuation) pair is one row; rows are sorted by length, right-padded and
run ``batch_size`` at a time, one forward each; the log-probabilities of the continuation's tokens
are gathered from the positions that predict them. The letter form needs only the prompt's last
position, so it runs one row per question instead of four. A batch holds B x T x V logits in the
model's dtype (16 x 1,000 x 49,152 in fp32 is 3 GiB): lower ``batch_size`` for long 5-shot prompts.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from raftune.data import DataError
from raftune.models import context_length, eval_mode
from raftune.sequences import chat_prompt_ids, pad_right, text_ids

SPLITS = ("dev", "val", "test")
FORMS = ("letter", "cloze")
LETTERS = ("A", "B", "C", "D")
COLUMNS = ("question", "A", "B", "C", "D", "answer")

# The prompts are data: the original harness's letter form, and the cloze form.
LETTER_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
LETTER_QUESTION = "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:"
CLOZE_QUESTION = "Question: {question}\nAnswer:"
SHOT_END = " {answer}\n\n"  # after a shot's "Answer:": its letter (letter form) or its answer's text (cloze)


@dataclass(frozen=True)
class MMLUQuestion:
    subject: str  # e.g. "high_school_biology", as in the file name
    question: str
    choices: tuple[str, str, str, str]  # A, B, C, D
    answer: int  # 0-3, the index of the correct choice


# --- loading ---------------------------------------------------------------------------------------

def _split_dir(folder: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    path = Path(folder) / split
    if not path.is_dir():
        raise DataError(str(path), None, None,
                        f"no such folder: pass the MMLU folder holding {'/, '.join(SPLITS)}/ with "
                        f"<subject>_<split>.csv files (the original hendrycks layout)")
    return path


def mmlu_subjects(folder: str | Path, split: str = "test") -> list[str]:
    """The subjects with a CSV in ``{folder}/{split}/``, sorted."""
    suffix = f"_{split}.csv"
    return sorted(p.name[: -len(suffix)] for p in _split_dir(folder, split).glob(f"*{suffix}"))


def _read_subject(path: Path, subject: str, limit: int | None) -> list[MMLUQuestion]:
    label = str(path)
    out: list[MMLUQuestion] = []
    end = 0  # physical line on which the previous record ended
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)  # an unclosed quote is an error, not a field that eats the file
        try:
            for values in reader:
                line, end = end + 1, reader.line_num  # a record's first line: quoted fields may span lines
                if not values:  # blank line
                    continue
                if limit is not None and len(out) >= limit:
                    break
                out.append(_parse_row(values, subject, label, line))
        except csv.Error as e:
            raise DataError(label, end + 1, None, f"malformed CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError(label, end + 1, None, f"not UTF-8 text ({e.reason})") from None
    return out


def _parse_row(values: list[str], subject: str, label: str, line: int) -> MMLUQuestion:
    if len(values) < len(COLUMNS):
        raise DataError(label, line, COLUMNS[len(values)],
                        f"missing: the row has {len(values)} values, expected 6 ({', '.join(COLUMNS)})")
    if len(values) > len(COLUMNS):
        raise DataError(label, line, None, f"{len(values)} values, expected 6 ({', '.join(COLUMNS)})")
    question, *choices, letter = values
    if not question.strip():
        raise DataError(label, line, "question", "empty")
    for name, choice in zip(LETTERS, choices):
        if not choice.strip():
            raise DataError(label, line, name, "empty choice")
    if letter.strip() not in LETTERS:
        raise DataError(label, line, "answer", f"{letter!r} is not one of A, B, C, D")
    return MMLUQuestion(subject, question, tuple(choices), LETTERS.index(letter.strip()))


def load_mmlu(folder: str | Path, split: str = "test", subjects: list[str] | None = None,
              limit_per_subject: int | None = None) -> list[MMLUQuestion]:
    """The questions of ``split``, subject by subject (sorted, or in the order given), each subject's
    first ``limit_per_subject`` rows in file order. Bad rows raise a ``DataError`` naming the file,
    the first line of the record and the field."""
    if limit_per_subject is not None and limit_per_subject < 0:
        raise ValueError(f"limit_per_subject must be >= 0, got {limit_per_subject}")
    split_dir = _split_dir(folder, split)
    available = mmlu_subjects(folder, split)
    if subjects is None:
        subjects = available
    unknown = [s for s in subjects if s not in available]
    if unknown:
        raise DataError(str(split_dir), None, "subjects",
                        f"no file for {', '.join(map(repr, unknown))}; there are {len(available)}: "
                        f"{', '.join(available)}")
    out: list[MMLUQuestion] = []
    for subject in subjects:
        out.extend(_read_subject(split_dir / f"{subject}_{split}.csv", subject, limit_per_subject))
    return out


def few_shot_examples(folder: str | Path, subject: str, k: int) -> list[MMLUQuestion]:
    """The first ``k`` questions of the subject's dev split (there are 5 in the original data)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    shots = load_mmlu(folder, "dev", [subject], limit_per_subject=k)
    if len(shots) < k:
        raise DataError(str(Path(folder) / "dev" / f"{subject}_dev.csv"), None, None,
                        f"{k} shots asked for, but the dev split has only {len(shots)} questions")
    return shots


# --- prompts (pure) --------------------------------------------------------------------------------

def _letter_block(q: MMLUQuestion) -> str:
    return LETTER_QUESTION.format(question=q.question.strip(), **dict(zip(LETTERS, q.choices)))


def letter_prompt(question: MMLUQuestion, shots: Sequence[MMLUQuestion] = ()) -> str:
    """The original harness's prompt: header, shots answered by letter, then the question up to "Answer:"."""
    head = LETTER_HEADER.format(subject=question.subject.replace("_", " "))
    done = "".join(_letter_block(s) + SHOT_END.format(answer=LETTERS[s.answer]) for s in shots)
    return head + done + _letter_block(question)


def cloze_prompt(question: MMLUQuestion, shots: Sequence[MMLUQuestion] = ()) -> str:
    """"Question: ..\\nAnswer:", the shots answered by their correct choice's text; no choices listed."""
    done = "".join(CLOZE_QUESTION.format(question=s.question.strip()) + SHOT_END.format(answer=s.choices[s.answer])
                   for s in shots)
    return done + CLOZE_QUESTION.format(question=question.question.strip())


# --- scoring ---------------------------------------------------------------------------------------

def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_lengths(model, seqs: Sequence[Sequence[int]]) -> None:
    limit = context_length(model)
    longest = max(len(s) for s in seqs)
    if limit is not None and longest > limit:
        raise ValueError(f"a sequence of {longest} tokens exceeds the model's {limit} positions: "
                         f"use fewer shots")


def _batches(order: list[int], batch_size: int, progress: bool, what: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress) as bar:
        task = bar.add_task(what, total=len(order))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            yield batch
            bar.update(task, advance=len(batch))


def _forward(model, seqs: list[list[int]]) -> torch.Tensor:
    # Right padding: each row's real tokens keep positions 0..L-1 and, the attention being causal,
    # never see the padding after them, so the pad id is irrelevant.
    ids_BT, mask_BT = pad_right(seqs, pad_id=0)
    dev = _device(model)
    return model(input_ids=ids_BT.to(dev), attention_mask=mask_BT.to(dev)).logits  # (B, T, V)


@torch.inference_mode()
def continuation_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16,
                          progress: bool = False) -> list[tuple[float, int]]:
    """(summed log-probability of the continuation given the prompt, its number of tokens) per
    (prompt_ids, continuation_ids) pair, in the order given."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for prompt, cont in pairs:
        if not prompt or not cont:
            raise ValueError("every prompt and continuation needs at least one token")
    seqs = [list(p) + list(c) for p, c in pairs]
    _check_lengths(model, seqs)
    order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))  # longest first: an OOM shows at once
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    with eval_mode(model):
        for batch in _batches(order, batch_size, progress, "mmlu"):
            logits_BTV = _forward(model, [seqs[i] for i in batch])
            for row, i in enumerate(batch):
                P, C = len(pairs[i][0]), len(pairs[i][1])
                # logits at position t predict token t + 1: the continuation's tokens P..P+C-1 come from P-1..P+C-2
                logp_CV = torch.log_softmax(logits_BTV[row, P - 1 : P + C - 1].float(), dim=-1)  # (C, V)
                target_C = torch.tensor(pairs[i][1], device=logp_CV.device)
                out[i] = (logp_CV.gather(-1, target_C[:, None]).sum().item(), C)
    return out


@torch.inference_mode()
def next_token_logprobs(model, prompts: Sequence[list[int]], token_ids: Sequence[int], *, batch_size: int = 16,
                        progress: bool = False) -> torch.Tensor:
    """(N, K) fp32 log-probabilities of ``token_ids`` as the token after each prompt."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    _check_lengths(model, prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out_NK = torch.zeros(len(prompts), len(token_ids))
    targets_K = torch.tensor(list(token_ids))
    with eval_mode(model):
        for batch in _batches(order, batch_size, progress, "mmlu"):
            logits_BTV = _forward(model, [list(prompts[i]) for i in batch])
            last_B = torch.tensor([len(prompts[i]) - 1 for i in batch], device=logits_BTV.device)
            logits_BV = logits_BTV[torch.arange(len(batch), device=logits_BTV.device), last_B]
            logp_BV = torch.log_softmax(logits_BV.float(), dim=-1)
            out_NK[batch] = logp_BV[:, targets_K.to(logp_BV.device)].cpu()
    return out_NK


def _plain_ids(tokenizer, text: str) -> list[int]:
    return text_ids(tokenizer, text)


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    return chat_prompt_ids(tokenizer, prompt) if chat else text_ids(tokenizer, prompt, add_special_tokens=True)


def score_mmlu(model, tokenizer, questions: Sequence[MMLUQuestion], *, shots: int = 0, form: str = "letter",
               folder: str | Path | None = None, batch_size: int = 16, progress: bool = False,
               chat: bool = False) -> dict:
    """Accuracy of ``model`` on ``questions``; ``shots`` > 0 takes each subject's first dev questions
    from ``folder``. Returns {"accuracy", "n", "form", "shots", "chat", "per_subject": {subject:
    {"accuracy", "n"}}, "per_question": [{"subject", "answer", "predicted", "correct", "scores"}]},
    where scores are the four choices' log-probabilities (letter) or their per-token mean
    log-probabilities (cloze)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if shots and folder is None:
        raise ValueError("shots > 0 needs folder, the MMLU folder whose dev split holds the examples")
    if not questions:
        raise ValueError("no questions to score")

    subjects = list(dict.fromkeys(q.subject for q in questions))  # in order of first appearance
    examples = {s: few_shot_examples(folder, s, shots) for s in subjects} if shots else {}
    build = letter_prompt if form == "letter" else cloze_prompt
    prompts = [_prompt_ids(tokenizer, build(q, examples.get(q.subject, ())), chat) for q in questions]
    lead = "" if chat else " "  # a chat reply opens without a space; running text has one after "Answer:"

    if form == "letter":
        letter_ids = [_plain_ids(tokenizer, lead + letter) for letter in LETTERS]
        if all(len(ids) == 1 for ids in letter_ids):
            scores_NK = next_token_logprobs(model, prompts, [ids[0] for ids in letter_ids],
                                            batch_size=batch_size, progress=progress)
            scores = scores_NK.tolist()
        else:  # the letters are several tokens: their summed log-probability
            pairs = [(p, ids) for p in prompts for ids in letter_ids]
            sums = continuation_logprobs(model, pairs, batch_size=batch_size, progress=progress)
            scores = [[s for s, _ in sums[4 * i : 4 * i + 4]] for i in range(len(questions))]
    else:
        pairs = [(p, _plain_ids(tokenizer, lead + choice)) for p, q in zip(prompts, questions) for choice in q.choices]
        sums = continuation_logprobs(model, pairs, batch_size=batch_size, progress=progress)
        scores = [[s / n for s, n in sums[4 * i : 4 * i + 4]] for i in range(len(questions))]

    per_question = []
    for q, sc in zip(questions, scores):
        predicted = max(range(4), key=lambda j: (sc[j], -j))  # ties: the earliest choice
        per_question.append({"subject": q.subject, "answer": q.answer, "predicted": predicted,
                             "correct": predicted == q.answer, "scores": [float(x) for x in sc]})
    per_subject: dict[str, dict] = {}
    for subject in subjects:
        hits = [r["correct"] for r in per_question if r["subject"] == subject]
        per_subject[subject] = {"accuracy": sum(hits) / len(hits), "n": len(hits)}
    n_correct = sum(r["correct"] for r in per_question)
    return {"accuracy": n_correct / len(questions), "n": len(questions), "form": form, "shots": shots, "chat": chat,
            "per_subject": per_subject, "per_question": per_question}
