"""Evaluation: domain accuracy (D-Acc), IFEval, MMLU, judged general QA, drift, weight distance, retention.

    raftune eval --model runs/train-<hash>/model --suite domain,ifeval,mmlu \\
        --domain-data runs/refine-<hash>/heldout.jsonl --ifeval-data ../shared/data/ifeval/input_data.jsonl \\
        --mmlu-folder ../shared/data/mmlu --mmlu-subjects anatomy,virology --base-results runs/eval-base/results.json

Each suite is a function of the config and the opened models that returns (summary, per-sample rows).
``evaluate`` runs the chosen suites and writes ``<out_dir>/eval-<name or hash>/``: ``results.json``
(every suite's summary, the config, and retention when a base results.json is given) and one
``<suite>.jsonl`` of per-sample rows per suite, all written atomically.

- domain: greedy answers to held-out questions; every judge says correct or incorrect against the
  reference (template ``domain_judge``, parsed by ``parse_verdict``, unreadable replies asked again);
  a sample is correct when a strict majority of the readable verdicts says so (``majority_vote``).
  D-Acc is over the samples with at least one readable verdict; the others are counted. ROUGE-L F1
  and the embedding cosine to the reference are judge-free companions, always reported.
- ifeval: greedy responses in the chat format, scored strictly and loosely (``raftune.ifeval``).
- mmlu: log-likelihood scoring (``raftune.mmlu``), cloze form and 0 shots by default.
- general: greedy answers to general prompts. ``general_mode: score``: every judge scores each answer
  1-10 (``general_judge``); ``pairwise``: every judge compares it with the base model's answer in
  both orders (``pairwise_judge``, MT-Bench's rule: a win counts only when both orders agree,
  otherwise a tie; identical answers are a tie without asking). Judges are combined per prompt by
  ``general_aggregate``: ``mean``, or ``majority`` (the median score; the outcome most judges gave).
- drift / weights: judge-free forgetting measures against ``base_model`` (``raftune.forgetting``).
- lm-eval: any lm-evaluation-harness task by name, or the user's own from a task folder, run through
  raftune's model class (``raftune.lmeval``, the optional ``lm-eval`` extra); lm-eval's metric names and
  standard errors per task; its logged samples are the rows.
- retention (paper Appendix G): score / base score for ifeval prompt_strict, mmlu accuracy and
  general mean_score (or win_rate, which is 0.5 for the base model against itself), and for every
  higher-is-better metric of every lm-eval task.

Judge templates are data (``raftune.templates``): ``--templates FILE`` overrides any of them.

A stopped evaluation resumes: every completion (the model's answers, the judges' replies) is logged
to ``completions.jsonl`` as each batch finishes and served from it when the same run asks again, and
``results.json`` is rewritten after every suite (``"complete": false`` until the last), so a rerun
skips the suites already done.

A failed generation (the model's answer or a judge call failing after the backend's retries: a server
answering 5xx, or 200 with no chat completion) is a failure, never an answer: it is not logged, not
judged, not scored. A suite with failed samples is not scored at all (after asking everything else,
so that it is logged); the run goes on with the other suites, then writes results.json with
``"complete": false`` and the failed suites and samples under ``failed``, and raises
``GenerationFailed``. The same command run again asks exactly the failed generations again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import statistics
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from raftune import outputs
from raftune.files import atomic_write_json, atomic_write_jsonl, stable_hash
from raftune.generation import (
    DEFAULT_API_KEY_ENV,
    CachedGenerator,
    CompletionLog,
    GenerationFailed,
    Generator,
    Messages,
    SamplingParams,
    is_remote_spec,
    open_generator,
    public_spec,
    public_specs,
    server_api_key,
)
from raftune.judging import judge_errors, score_with_judges
from raftune.sequences import special_token_hits, warn_special_text
from raftune.settings import CommaList, Device, Dtype, NonNegative, Positive, PositiveFloat, settings
from raftune.templates import EVAL_TEMPLATES, load_templates

log = logging.getLogger("raftune.evaluate")

SUITES = ("domain", "ifeval", "mmlu", "general", "drift", "weights", "lm-eval")
LOCAL_SUITES = ("mmlu", "drift", "weights", "lm-eval")  # they read logits or weights: no chat server can do them
# (suite, metric) pairs whose ratio to the base model's is the retention of Appendix G
RETENTION_METRICS = (("ifeval", "prompt_strict"), ("mmlu", "accuracy"), ("general", "mean_score"), ("general", "win_rate"))

# --- pure pieces -----------------------------------------------------------------------------------------

_POSITIVE = {"correct", "right", "true", "yes", "accurate"}
_NEGATIVE = {"incorrect", "wrong", "false", "no", "inaccurate", "not correct", "not right", "not accurate"}
_LABEL = r"(not\s+correct|not\s+right|not\s+accurate|incorrect|inaccurate|correct|accurate|right|wrong|true|false|yes|no)"
_EXPLICIT = re.compile(r"\b(?:verdict|answer|judgement|judgment)\b\s*(?:is|:|=|-)?\s*" + _LABEL + r"\b")
_WORDS = re.compile(r"\b" + _LABEL + r"\b")
# words that may stand alone in a reply but are too common to count inside running text
_FIRST_WORD_ONLY = {"yes", "no", "true", "false", "right"}


def _label(word: str) -> bool:
    return " ".join(word.split()) in _POSITIVE


def parse_verdict(text: str) -> bool | None:
    """True (correct), False (incorrect), or None when the reply holds no unambiguous verdict.

    "Verdict: correct" (any case, markdown stripped) decides first, unless the reply also gives the
    opposite verdict that way; then a reply that opens with a verdict word ("Incorrect.", "Yes, ...");
    then a reply whose verdict words in running text ("correct", "incorrect", "wrong", "not correct",
    ...) all agree. Conflicting words give None, as does "yes"/"no" inside running text.
    """
    if not text:
        return None
    t = re.sub(r"[*_`#\"'\[\]]", " ", text.lower())
    explicit = {_label(w) for w in _EXPLICIT.findall(t)}
    if explicit:  # a judge that parrots "Verdict: correct, or Verdict: incorrect" has decided nothing
        return explicit.pop() if len(explicit) == 1 else None
    first = re.match(r"\s*[:\-.,]*\s*" + _LABEL + r"\b", t)
    if first:
        return _label(first.group(1))
    found = {_label(w) for w in _WORDS.findall(t) if w not in _FIRST_WORD_ONLY}
    return found.pop() if len(found) == 1 else None


_WINNER = re.compile(r"\b(?:winner|better(?:\s+answer)?|verdict)\b\s*(?:is|:|=|-)?\s*(?:answer\s+)?\(?([ab]|tie)\)?(?![\w])")
_BRACKETED = re.compile(r"\[\[\s*([ab]|tie)\s*\]\]")


def parse_winner(text: str) -> str | None:
    """"A", "B" or "tie" from a pairwise judge's reply; None when it names no single winner.

    Explicit forms decide ("Winner: A", "[[B]]", "The better answer is B", "Verdict: tie"); else a
    reply that is A, B or tie, or opens with one and a stop ("B. It is more precise", "Tie"). Two
    different explicit winners, or running text alone ("A is shorter, but B ..."), give None.
    """
    if not text:
        return None
    t = re.sub(r"[*_`#\"']", " ", text.lower())
    found = set(_BRACKETED.findall(t)) | set(_WINNER.findall(t))
    if not found:
        m = re.match(r"\s*[:\-.,]*\s*(?:answer\s+)?\(?([ab]|tie)\)?(?=[.,:;!)]|\s*$)", t)  # "B." / "Tie" / " A"
        found = {m.group(1)} if m else set()
    if len(found) != 1:
        return None
    w = found.pop()
    return "tie" if w == "tie" else w.upper()


# value of a pairwise reply for the answer shown as A: won, tie, lost
_WINNER_VALUE = {"A": 1.0, "tie": 0.5, "B": 0.0}


def _winner_score(text: str) -> float | None:
    return _WINNER_VALUE.get(parse_winner(text))


def pairwise_outcome(as_a: float | None, as_b: float | None) -> float | None:
    """One judge's outcome for the tuned answer, from the reply with it shown as A (value for A) and the
    reply with it shown as B (value for A, i.e. the base answer): 1 win, 0.5 tie, 0 loss. MT-Bench's
    rule: the two orders must agree, otherwise it is a tie. None when either reply was unreadable."""
    if as_a is None or as_b is None:
        return None
    first, second = as_a, 1.0 - as_b
    return first if first == second else 0.5


def aggregate(values: Sequence[float | None], how: str) -> float | None:
    """Combine the judges' values for one prompt: ``mean``; ``majority``: the median (of scores, or of
    outcomes 0 / 0.5 / 1, where it is the outcome a majority is at or beyond). None if none is readable."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return sum(vals) / len(vals) if how == "mean" else float(statistics.median(vals))


def majority_vote(votes: Sequence[bool | None]) -> bool | None:
    """Correct when more readable votes say correct than incorrect; a tie is incorrect; no readable vote: None."""
    readable = [v for v in votes if v is not None]
    if not readable:
        return None
    yes = sum(readable)
    return yes > len(readable) - yes


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lowercased word tokens: LCS length against both lengths. Two empty texts give 1."""
    c, r = _tokens(candidate), _tokens(reference)
    if not c or not r:
        return 1.0 if not c and not r else 0.0
    prev = [0] * (len(r) + 1)
    for cw in c:  # LCS by dynamic programming, one row at a time
        cur = [0]
        for j, rw in enumerate(r):
            cur.append(prev[j] + 1 if cw == rw else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def _verdict_score(text: str) -> float | None:
    v = parse_verdict(text)
    return None if v is None else float(v)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def retention(results: dict, base_results: dict) -> dict:
    """score / base score for each general metric both results hold (None where the base is 0): those of
    ``RETENTION_METRICS``, and every higher-is-better lm-eval metric (``lm-eval.<task>/<metric>,<filter>``)."""
    pairs = list(RETENTION_METRICS)
    mine, theirs = (results.get("lm-eval") or {}).get("metrics") or {}, (base_results.get("lm-eval") or {}).get("metrics") or {}
    pairs += [("lm-eval", m) for m in mine if m in theirs]
    out = {}
    for suite, metric in pairs:
        score = ((results.get(suite) or {}).get("metrics") or {}).get(metric) if suite == "lm-eval" else \
            (results.get(suite) or {}).get(metric)
        base = ((base_results.get(suite) or {}).get("metrics") or {}).get(metric) if suite == "lm-eval" else \
            (base_results.get(suite) or {}).get(metric)
        if score is None or base is None:
            continue
        out[f"{suite}.{metric}"] = {"score": score, "base": base, "retention": score / base if base else None}
    return out


# --- config ----------------------------------------------------------------------------------------------

@settings
class LMEvalSettings:
    """The ``lm-eval`` suite's settings: ``lm_eval:`` in an eval config (or ``--lm-eval-*`` flags)."""

    tasks: Annotated[CommaList, Field(min_length=1)] = field(
        metadata={"help": "lm-eval task, group or tag names (lm-eval's, or the include_path folder's)"})
    num_fewshot: NonNegative | None = field(default=None, metadata={"help": "None: each task's own"})
    limit: Positive | None = field(default=None, metadata={"help": "the first N documents of each task (None: all)"})
    include_path: str | None = field(default=None, metadata={"help": "a folder of lm-eval task YAMLs: code you trust"})
    chat: bool | None = field(default=None, metadata={"help": "apply the chat template (None: where the tokenizer has one)"})
    fewshot_as_multiturn: bool | None = field(default=None, metadata={"help": "shots as chat turns (None: with chat)"})
    system_instruction: str | None = None
    gen_kwargs: dict[str, bool | int | float | str] | str | None = field(default=None, metadata={
        "help": "overrides of every generative task's settings, as lm-eval's --gen_kwargs (max_gen_toks=64)"})
    bootstrap_iters: NonNegative = field(default=100_000, metadata={"help": "lm-eval's, for the stderrs it bootstraps"})
    trust_code: bool = field(default=False, metadata={
        "help": "run the Python a task folder names (!function outside lm-eval) and tasks lm-eval marks unsafe"})

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(dict.fromkeys(self.tasks)))


@settings
class EvalConfig:
    model: str = field(metadata={"help": "the model to evaluate: 'default', folder, .gguf, hub id or server"})
    base_model: str = field(default="default", metadata={"help": "the model before tuning (drift, weights)"})
    suites: CommaList = field(default=("domain",), metadata={"help": f"any of {', '.join(SUITES)}"})
    out_dir: str = "runs"
    name: str | None = field(default=None, metadata={"help": "run folder eval-<name> [eval-<hash>]"})
    base_results: str | None = field(default=None, metadata={"help": "the base model's results.json, for retention"})
    domain_data: str | None = field(default=None, metadata={"help": "held-out QA data (a refine run's heldout.jsonl)"})
    domain_limit: Positive | None = None
    judges: Annotated[CommaList, Field(min_length=1)] = field(default=("default",), metadata={"help": "judge backends (domain, general)"})
    judge_retries: NonNegative = 2
    judge_max_new_tokens: Positive = 24
    encoder: str = field(default="default", metadata={"help": "sentence encoder of the domain cosine"})
    ifeval_data: str | None = None
    ifeval_limit: Positive | None = None
    mmlu_folder: str | None = None
    mmlu_subjects: CommaList | None = field(default=None, metadata={"help": "None: all subjects"})
    mmlu_limit_per_subject: Positive | None = None
    mmlu_shots: NonNegative = 0
    mmlu_form: Literal["letter", "cloze"] = "cloze"
    general_data: str | None = field(default=None, metadata={"help": "general prompts (MT-Bench question.jsonl, ...)"})
    general_limit: Positive | None = None
    general_mode: Literal["score", "pairwise"] = field(default="score", metadata={"help": "score (1-10 per answer) or pairwise (vs base_model's answer)"})
    general_aggregate: Literal["mean", "majority"] = field(default="mean", metadata={"help": "combining the judges per prompt: mean or majority"})
    templates: str | None = field(default=None, metadata={"help": "YAML file overriding the judge templates"})
    max_new_tokens: Positive = 256
    seed: int = 0
    lm_eval: LMEvalSettings | None = field(default=None, metadata={"help": "the lm-eval suite's tasks and settings"})
    # Execution settings: they change how fast, not what (left out of the run hash).
    batch_size: Positive = 16
    device: Device = None
    dtype: Dtype = None
    concurrency: Positive = field(default=8, metadata={"help": "requests in flight per server"})
    timeout_s: PositiveFloat = field(default=120.0, metadata={"help": "the most one server request may take, whole"})
    api_key_env: str = field(default=DEFAULT_API_KEY_ENV, metadata={"help": "environment variable holding the servers' API key"})

    def __post_init__(self):
        if any(map(is_remote_spec, (self.model, self.base_model, *self.judges))):
            server_api_key(self.api_key_env)  # a named key that is not set fails now, not at the first request
        suites = tuple(dict.fromkeys(self.suites))
        object.__setattr__(self, "suites", suites)
        needs = {"domain": "domain_data", "ifeval": "ifeval_data", "mmlu": "mmlu_folder", "general": "general_data",
                 "drift": "general_data"}
        load_templates(self.templates)  # a bad template file fails here, before any generation
        remote = [s for s in LOCAL_SUITES if s in suites and is_remote_spec(self.model)]
        checks = [
            (bool(self.model), "model is required"),
            (bool(suites), f"at least one suite is needed; known: {', '.join(SUITES)}"),
            (not (unknown := [s for s in suites if s not in SUITES]),
             f"suites: unknown suite(s) {unknown}; known: {', '.join(SUITES)}"),
            (not remote, f"suite(s) {remote} read the model's logits or weights: pass a local model, not a server"),
        ]
        checks.append(("lm-eval" not in suites or self.lm_eval is not None,
                       "suite lm-eval needs lm_eval.tasks (--lm-eval-task)"))
        for suite in suites:
            if suite in needs:
                checks.append((getattr(self, needs[suite]) is not None,
                               f"suite {suite} needs {needs[suite]} (--{needs[suite].replace('_', '-')})"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def output_settings(self) -> dict:
        skip = {"out_dir", "name", "batch_size", "device", "dtype", "concurrency", "timeout_s", "api_key_env"}
        d = public_specs({k: v for k, v in dataclasses.asdict(self).items() if k not in skip
                          and not (k == "lm_eval" and v is None)})  # the keys of runs made before the suite stand
        d["templates"] = {n: t.as_dict() for n, t in load_templates(self.templates).items()  # content, not path
                          if n in EVAL_TEMPLATES}
        return json.loads(json.dumps(d))  # tuples as lists: comparable with a results.json read back


def run_dir_for(cfg: EvalConfig) -> Path:
    return Path(cfg.out_dir) / f"eval-{cfg.name or stable_hash(cfg.output_settings(), 12)}"


# --- generation with progress ------------------------------------------------------------------------------

def _chat(gen: Generator, convs: list[Messages], params: SamplingParams, what: str, progress: bool) -> list:
    """``gen.chat`` in steps of its batch size, with a progress bar (generation is the slow part)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    step = getattr(gen, "batch_size", 32)
    out = []
    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task(what, total=len(convs))
        for s in range(0, len(convs), step):
            out.extend(gen.chat(convs[s : s + step], params))
            bar.update(task, advance=len(convs[s : s + step]))
    return out


def _greedy(cfg: EvalConfig) -> SamplingParams:
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)


def _user(text: str, system: str | None = None) -> Messages:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


# --- failed generations ---------------------------------------------------------------------------------

class _SuiteFailed(Exception):
    """Generations of a suite failed after the backend's retries: the suite is neither scored nor recorded.
    ``failed``: ``{"sample", "errors"}`` per failed sample (``sample``: its key, or its index)."""

    def __init__(self, failed: list[dict]):
        super().__init__(f"{len(failed)} samples failed")
        self.failed = failed


def _failed_generations(completions, what: str, errors: dict[int, list[str]] | None = None) -> dict[int, list[str]]:
    """``errors`` (a new dict if None) plus ``index: ["what: error"]`` for every completion that failed."""
    errors = {} if errors is None else errors
    for i, c in enumerate(completions):
        if c.error is not None:
            errors.setdefault(i, []).append(f"{what}: {c.error}")
    return errors


def _add_judge_errors(errors: dict[int, list[str]], indices: Sequence[int], verdicts) -> None:
    """Add the failed judge calls (not the unreadable replies: those are verdicts) of ``verdicts[k]``,
    which judged sample ``indices[k]``."""
    for i, vs in zip(indices, verdicts):
        if errs := judge_errors(vs):
            errors.setdefault(i, []).extend(errs)


def _raise_if_failed(errors: dict[int, list[str]], ids: Sequence) -> None:
    """Raise ``_SuiteFailed`` when any sample failed. Called once a suite has asked everything it can
    for the others, so that their completions are logged and a rerun asks only the failed ones."""
    if errors:
        raise _SuiteFailed([{"sample": ids[i], "errors": errs} for i, errs in sorted(errors.items())])


# --- suites ----------------------------------------------------------------------------------------------

def eval_domain(cfg: EvalConfig, model: Generator, judges: list[Generator], progress: bool) -> tuple[dict, list[dict]]:
    template = load_templates(cfg.templates)["domain_judge"]
    from raftune.data import load_qa
    from raftune.models import load_encoder
    from raftune.similarity import SemanticFilter

    examples, _ = load_qa(cfg.domain_data, limit=cfg.domain_limit)
    outs = _chat(model, [_user(ex.question, ex.system) for ex in examples], _greedy(cfg), "domain answers", progress)
    errors = _failed_generations(outs, "answer")
    answers = [c.text for c in outs]
    ok = [i for i in range(len(examples)) if i not in errors]  # a failed answer is no answer: not judged
    prompts = [template.render(question=examples[i].question, answer=examples[i].answer, candidate=answers[i])
               for i in ok]
    verdicts = score_with_judges(judges, prompts, max_new_tokens=cfg.judge_max_new_tokens, retries=cfg.judge_retries,
                                 seed=cfg.seed, parse=_verdict_score)
    _add_judge_errors(errors, ok, verdicts)
    _raise_if_failed(errors, [ex.key for ex in examples])  # past here every sample is answered and judged
    cosines = SemanticFilter(load_encoder(cfg.encoder, device=cfg.device)).similarities(
        [ex.answer for ex in examples], answers)
    rows = []
    for ex, answer, vs, cos in zip(examples, answers, verdicts, cosines):
        votes = [None if v.score is None else v.score == 1.0 for v in vs]
        rows.append({"key": ex.key, "question": ex.question, "reference": ex.answer, "answer": answer,
                     "verdicts": [{"judge": v.judge, "correct": vote, "reply": v.reply, "attempts": v.attempts}
                                  for v, vote in zip(vs, votes)],
                     "correct": majority_vote(votes), "rouge_l": rouge_l(answer, ex.answer), "cosine": cos})
    judged = [r["correct"] for r in rows if r["correct"] is not None]
    summary = {
        "d_acc": sum(judged) / len(judged) if judged else None,
        "n": len(rows),
        "n_judged": len(judged),
        "n_unjudged": len(rows) - len(judged),  # no judge gave a readable verdict
        "unreadable_verdicts": sum(v["correct"] is None for r in rows for v in r["verdicts"]),
        "rouge_l": _mean([r["rouge_l"] for r in rows]),
        "cosine": _mean([r["cosine"] for r in rows]),
        "judges": [j.name for j in judges],
    }
    return summary, rows


def eval_ifeval(cfg: EvalConfig, model: Generator, progress: bool) -> tuple[dict, list[dict]]:
    from raftune.ifeval import load_ifeval, score

    prompts = load_ifeval(cfg.ifeval_data)[: cfg.ifeval_limit]
    outs = _chat(model, [_user(p.prompt) for p in prompts], _greedy(cfg), "ifeval", progress)
    _raise_if_failed(_failed_generations(outs, "response"), [p.key for p in prompts])
    responses = [c.text for c in outs]
    result = score(prompts, responses)
    rows = [{**r, "prompt": p.prompt, "response": resp, "instruction_ids": p.instruction_ids}
            for p, resp, r in zip(prompts, responses, result.pop("per_prompt"))]
    return result, rows


def eval_mmlu(cfg: EvalConfig, model: Generator, progress: bool) -> tuple[dict, list[dict]]:
    from raftune.mmlu import load_mmlu, score_mmlu

    subjects = list(cfg.mmlu_subjects) if cfg.mmlu_subjects is not None else None
    questions = load_mmlu(cfg.mmlu_folder, "test", subjects=subjects, limit_per_subject=cfg.mmlu_limit_per_subject)
    result = score_mmlu(model.model, model.tokenizer, questions, shots=cfg.mmlu_shots, form=cfg.mmlu_form,
                        folder=cfg.mmlu_folder, batch_size=cfg.batch_size, progress=progress)
    rows = [{**r, "question": q.question, "choices": list(q.choices)}
            for q, r in zip(questions, result.pop("per_question"))]
    return result, rows


def eval_general(cfg: EvalConfig, model: Generator, judges: list[Generator], base: Generator | None,
                 progress: bool) -> tuple[dict, list[dict]]:
    from raftune.forgetting import load_general_prompts

    prompts = load_general_prompts(cfg.general_data, limit=cfg.general_limit)
    outs = _chat(model, [_user(p) for p in prompts], _greedy(cfg), "general answers", progress)
    errors = _failed_generations(outs, "answer")  # failed answers are neither judged nor scored
    answers = [c.text for c in outs]
    ids = list(range(len(prompts)))
    judging = dict(max_new_tokens=cfg.judge_max_new_tokens, retries=cfg.judge_retries, seed=cfg.seed)
    summary = {"mode": cfg.general_mode, "aggregate": cfg.general_aggregate, "judges": [j.name for j in judges]}
    if cfg.general_mode == "score":
        template = load_templates(cfg.templates)["general_judge"]
        ok = [i for i in ids if i not in errors]
        verdicts = score_with_judges(judges, [template.render(question=prompts[i], answer=answers[i]) for i in ok],
                                     **judging)
        _add_judge_errors(errors, ok, verdicts)
        _raise_if_failed(errors, ids)
        rows = [{"prompt": p, "answer": a, "score": aggregate([v.score for v in vs], cfg.general_aggregate),
                 "verdicts": [{"judge": v.judge, "score": v.score, "reply": v.reply, "attempts": v.attempts} for v in vs]}
                for p, a, vs in zip(prompts, answers, verdicts)]
        scored = [r["score"] for r in rows if r["score"] is not None]
        summary.update(mean_score=_mean(scored), n=len(rows), n_scored=len(scored), n_unscored=len(rows) - len(scored),
                       scale=[1, 10])
        return summary, rows

    # pairwise: against the base model's answer, each judge asked with the tuned answer first, then second
    template = load_templates(cfg.templates)["pairwise_judge"]
    base_outs = _chat(base, [_user(p) for p in prompts], _greedy(cfg), "base answers", progress)
    _failed_generations(base_outs, "base answer", errors)
    base_answers = [c.text for c in base_outs]
    asked = [i for i, (a, b) in enumerate(zip(answers, base_answers)) if a != b and i not in errors]  # identical ones tie
    convs = [template.render(question=prompts[i], answer_a=answers[i], answer_b=base_answers[i]) for i in asked] + \
            [template.render(question=prompts[i], answer_a=base_answers[i], answer_b=answers[i]) for i in asked]
    verdicts = score_with_judges(judges, convs, **judging, parse=_winner_score)
    _add_judge_errors(errors, asked + asked, verdicts)
    _raise_if_failed(errors, ids)
    rows = []
    for i, (p, a, b) in enumerate(zip(prompts, answers, base_answers)):
        row = {"prompt": p, "answer": a, "base_answer": b}
        if i not in asked:
            rows.append({**row, "outcome": 0.5, "identical": True, "verdicts": []})
            continue
        k = asked.index(i)
        first, second = verdicts[k], verdicts[k + len(asked)]
        per_judge = [{"judge": v1.judge, "outcome": pairwise_outcome(v1.score, v2.score),
                      "tuned_first": v1.reply, "tuned_second": v2.reply, "attempts": v1.attempts + v2.attempts}
                     for v1, v2 in zip(first, second)]
        rows.append({**row, "outcome": aggregate([j["outcome"] for j in per_judge], cfg.general_aggregate),
                     "identical": False, "verdicts": per_judge})
    judged = [r["outcome"] for r in rows if r["outcome"] is not None]
    summary.update(win_rate=_mean(judged), wins=sum(o > 0.5 for o in judged), ties=sum(o == 0.5 for o in judged),
                   losses=sum(o < 0.5 for o in judged), identical=sum(r["identical"] for r in rows), n=len(rows),
                   n_judged=len(judged), n_unjudged=len(rows) - len(judged), against=base.name)
    return summary, rows


def eval_drift(cfg: EvalConfig, model: Generator, base: Generator, progress: bool) -> tuple[dict, list[dict]]:
    from raftune.forgetting import drift, load_general_prompts

    prompts = load_general_prompts(cfg.general_data, limit=cfg.general_limit)
    # the base model's greedy answers, as the general suite asks for them: made once, logged, shared
    outs = _chat(base, [_user(p) for p in prompts], _greedy(cfg), "base answers", progress)
    _raise_if_failed(_failed_generations(outs, "base answer"), list(range(len(prompts))))
    answers = [c.text for c in outs]
    result = drift(base.model, model.model, base.tokenizer, prompts, answers, batch_size=max(1, cfg.batch_size // 2))
    rows = [{"prompt": p, "base_answer": a, **r} for p, a, r in zip(prompts, answers, result.pop("per_prompt"))]
    return result, rows


def eval_lm_eval(cfg: EvalConfig, model: Generator, run: Path, progress: bool) -> tuple[dict, list[dict]]:
    """The lm-eval tasks through raftune's model class (``raftune.lmeval.run_suite``); its requests are logged
    in the run folder, so a stopped suite resumes request by request."""
    from raftune.lmeval import run_suite

    return run_suite(cfg.lm_eval, model, run, identity=getattr(model, "identity", None), progress=progress)


def eval_weights(model: Generator, base: Generator, run: Path) -> tuple[dict, list[dict]]:
    from raftune.forgetting import plot_weight_distance, weight_distance

    result = weight_distance(base.model, model.model)
    png = plot_weight_distance(result, run / "weight_distance.png", title=f"{model.name} vs {base.name}")
    rows = [{"tensor": n, "distance": d} for n, d in result.pop("per_tensor").items()]
    return {**result, "plot": str(png)}, rows


# the data fields of each suite's rows (not the model's answers)
_DATA_FIELDS = {"domain": ("question", "reference"), "ifeval": ("prompt",), "mmlu": ("question", "choices"),
                "general": ("prompt",), "drift": ("prompt",)}


def _special_text_rows(suite: str, rows: list[dict], model: Generator) -> int:
    """The suite's rows whose data held special-token strings (tokenized as text, or sent to a server as text)."""
    fields = _DATA_FIELDS.get(suite, ())
    texts = [[t for f in fields for t in (r[f] if isinstance(r[f], list) else [r[f]])] for r in rows]
    tok = getattr(model, "tokenizer", None)  # None: a server's model, whose tokenizer is not known here
    n = special_token_hits(tok, texts) if fields else 0
    warn_special_text(log, f"eval {suite}", n, len(rows), server=tok is None)
    return n


# --- the run ---------------------------------------------------------------------------------------------

def check_suite_data(cfg: EvalConfig) -> None:
    """Every suite's data is read before any suite runs: a bad file fails the start, not the third suite an
    hour later (each loader raises a DataError naming the file, line and field)."""
    from raftune.data import load_qa
    from raftune.forgetting import load_general_prompts
    from raftune.ifeval import load_ifeval
    from raftune.mmlu import load_mmlu

    if "domain" in cfg.suites:
        load_qa(cfg.domain_data, limit=cfg.domain_limit)
    if "ifeval" in cfg.suites:
        load_ifeval(cfg.ifeval_data)
    if "mmlu" in cfg.suites:
        subjects = list(cfg.mmlu_subjects) if cfg.mmlu_subjects is not None else None
        load_mmlu(cfg.mmlu_folder, "test", subjects=subjects, limit_per_subject=1)
    if {"general", "drift"} & set(cfg.suites):
        load_general_prompts(cfg.general_data, limit=cfg.general_limit)
    if "lm-eval" in cfg.suites:  # lm-eval installed, the task folder allowed, every task name known
        from raftune.lmeval import check_tasks

        check_tasks(cfg.lm_eval.include_path, cfg.lm_eval.tasks, cfg.lm_eval.trust_code)


def eval_inputs(cfg: EvalConfig) -> dict:
    """The content of everything an evaluation reads (models and data), for its key: a model replaced at
    the same path is evaluated again, never reported with the old one's numbers."""
    from raftune.models import DEFAULT_ENCODER, embedded_encoder_path

    encoder = str(embedded_encoder_path()) if cfg.encoder == DEFAULT_ENCODER else cfg.encoder
    fp = outputs.model_fingerprint
    inputs = {"model": fp(cfg.model), "base_model": fp(cfg.base_model), "judges": [fp(j) for j in cfg.judges],
              "encoder": fp(encoder),
              "data": {k: outputs.data_fingerprint(getattr(cfg, k)) for k in ("domain_data", "ifeval_data",
                                                                                "mmlu_folder", "general_data")}}
    if "lm-eval" in cfg.suites:  # the task folder, the files its tasks read, lm-eval's version (its own tasks)
        from raftune.lmeval import task_inputs

        inputs["data"]["lm_eval"] = stable_hash(task_inputs(cfg.lm_eval.include_path, cfg.lm_eval.tasks), 32)
    return inputs


def evaluate(cfg: EvalConfig, progress: bool = True) -> Path:
    """Run ``cfg.suites`` and write the run folder; returns its path. Resumes a stopped run of the same
    settings and inputs: suites in its results.json are kept, and logged completions are not asked again.

    Raises ``GenerationFailed`` after the last suite when generations of some suites failed; those suites
    are listed under ``failed`` in results.json (``"complete": false``) and computed again by a rerun."""
    with contextlib.ExitStack() as hold:  # the run folder's lock, held until the evaluation ends
        return _evaluate(cfg, progress, hold)


def _evaluate(cfg: EvalConfig, progress: bool, hold: contextlib.ExitStack) -> Path:
    base_results = None
    if cfg.base_results is not None:  # read first: a bad path fails before hours of generation
        try:
            base_raw = json.loads(Path(cfg.base_results).read_text(encoding="utf-8"))
            base_results = base_raw["suites"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{cfg.base_results}: not a readable eval results.json ({type(e).__name__}: {e})") from None
    check_suite_data(cfg)
    run = run_dir_for(cfg)
    inputs = eval_inputs(cfg)
    key = stable_hash({"settings": cfg.output_settings(), "inputs": inputs}, 16)
    if base_results is not None and (base_raw.get("inputs") or {}).get("model") not in (None, inputs["base_model"]):
        log.warning("%s was made from another model than base_model %s (their content differs): retention is "
                    "measured against it, and its logged answers are not reused", cfg.base_results, cfg.base_model)
    summaries = _finished_suites(run, cfg, key)
    todo = [s for s in cfg.suites if s not in summaries]
    if summaries:
        log.info("%s: resuming; suites already done: %s", run, ", ".join(summaries))
    opts = dict(batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype, concurrency=cfg.concurrency,
                timeout_s=cfg.timeout_s, api_key_env=cfg.api_key_env)
    # every completion is logged: a rerun asks nothing twice, and the base model's answers that its own
    # evaluation made (general prompts) serve as the base answers of the drift and pairwise suites
    base_log = Path(cfg.base_results).parent / "completions.jsonl" if cfg.base_results else None
    needs_base = {"drift", "weights"} | ({"general"} if cfg.general_mode == "pairwise" else set())
    # the backends before the folder: a model that cannot be loaded is refused with nothing left behind
    wanted = ([cfg.model] if todo else []) + (list(cfg.judges) if {"domain", "general"} & set(todo) else []) \
        + ([cfg.base_model] if needs_base & set(todo) else [])
    backend = {spec: open_generator(spec, **opts) for spec in dict.fromkeys(wanted)}
    claim = outputs.claim(run, "eval", key, other_key="redo", what=f"model {public_spec(cfg.model)}")
    hold.enter_context(outputs.locked(run, f"evaluating {public_spec(cfg.model)}"))
    if not claim.same:  # a new folder, or one of other settings or inputs: nothing of the old results stands
        for stale in [run / "results.json", *(run / f"{s}.jsonl" for s in SUITES)]:
            stale.unlink(missing_ok=True)
    completions = CompletionLog(run / "completions.jsonl", also=[base_log] if base_log and base_log.exists() else [])
    if completions.entries:
        log.info("%s: %d logged completions will be reused", run, len(completions.entries))
    identity = {cfg.model: inputs["model"], cfg.base_model: inputs["base_model"], **dict(zip(cfg.judges, inputs["judges"]))}

    def opened(spec: str) -> Generator:  # logged under the model's content: another model's answers never match
        return CachedGenerator(backend[spec], completions, identity=identity[spec])

    model = opened(cfg.model) if todo else None
    judges = [opened(j) for j in cfg.judges] if {"domain", "general"} & set(todo) else []
    base = opened(cfg.base_model) if needs_base & set(todo) else None
    # the length guard's counts of this evaluation: each backend once (a judge may be the model itself), and
    # only what it cut here (a backend lives on across the evaluations of one process, e.g. `raftune run`)
    backends = {id(g.inner): g.inner for g in [model, *judges, base] if g is not None}
    counters = ("truncated_prompts", "cut_replies")  # local prompts cut to the context; server replies cut to max_tokens
    cut_before = {(k, c): getattr(g, c, 0) for k, g in backends.items() for c in counters}

    failed: dict[str, dict] = {}  # suite -> the samples whose generations failed, with why

    def write_results(complete: bool) -> None:
        results = {"suites": summaries, "config": public_specs(dataclasses.asdict(cfg)), "settings": cfg.output_settings(),
                   "inputs": inputs, "run_dir": str(run), "complete": complete}
        if failed:
            results["failed"] = failed
        for c in counters:
            if cut := sum(getattr(g, c, 0) - cut_before[k, c] for k, g in backends.items()):
                results[c] = cut
        if fell_back := {g.name: e.compile_fallback for g in backends.values()
                         if (e := getattr(g, "engine", None)) is not None and e.compile_fallback}:
            results["compile_fallback"] = fell_back  # local models whose compiled decoding failed: decoded eagerly
        if base_results is not None:
            results["retention"] = retention(summaries, base_results)
        atomic_write_json(run / "results.json", results)

    for suite in todo:
        try:
            if suite == "domain":
                summary, rows = eval_domain(cfg, model, judges, progress)
            elif suite == "ifeval":
                summary, rows = eval_ifeval(cfg, model, progress)
            elif suite == "mmlu":
                summary, rows = eval_mmlu(cfg, model, progress)
            elif suite == "general":
                summary, rows = eval_general(cfg, model, judges, base, progress)
            elif suite == "drift":
                summary, rows = eval_drift(cfg, model, base, progress)
            elif suite == "lm-eval":
                summary, rows = eval_lm_eval(cfg, model, run, progress)
            else:
                summary, rows = eval_weights(model, base, run)
        except _SuiteFailed as e:  # not scored on what it has; the other suites still run
            failed[suite] = {"n_failed": len(e.failed), "samples": e.failed}
            log.error("suite %s: %d samples failed and are not scored (first: %s: %s)", suite, len(e.failed),
                      e.failed[0]["sample"], e.failed[0]["errors"][0])
            write_results(complete=False)
            continue
        atomic_write_jsonl(run / f"{suite}.jsonl", rows)
        special = summary.get("rows_with_special_token_text")  # lm-eval counts its own, request by request
        summaries[suite] = {**summary, "rows_with_special_token_text":
                            _special_text_rows(suite, rows, model) if special is None else special}
        write_results(complete=False)
    if failed:
        n = sum(f["n_failed"] for f in failed.values())
        first = " ".join(next(iter(failed.values()))["samples"][0]["errors"][0].split())  # one line
        where = ", ".join(f"{s} ({f['n_failed']})" for s, f in failed.items())
        raise GenerationFailed(
            f"eval: {n} samples of suite(s) {where} failed, "
            f"a generation failing after its retries (first: {first}); those suites are not scored, the others are "
            f"in {run / 'results.json'} (complete: false). Run the same command again to retry exactly the failed "
            f"generations.", run, failed)
    summaries = {s: summaries[s] for s in cfg.suites}  # the configured order
    write_results(complete=True)
    outputs.mark_complete(run)
    return run


def _finished_suites(run: Path, cfg: EvalConfig, key: str) -> dict[str, dict]:
    """The summaries of the suites a previous run with the same settings and inputs (``key``, which hashes both)
    finished in ``run``. Another key finds none: ``outputs.claim`` then says the folder's output is made again."""
    path = run / "results.json"
    manifest = outputs.read_manifest(run)
    if not path.exists() or manifest is None or manifest["kind"] != "eval" or manifest["key"] != key:
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return {s: v for s, v in old.get("suites", {}).items() if s in cfg.suites and (run / f"{s}.jsonl").exists()}
