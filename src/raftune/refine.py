"""Stage 1 of RAFT: offline data refinement (paper Section 3.2, Appendices C-E.1).

    raftune refine --data demo --limit 64

For each training pair (x, a): the original model rewrites a in its own words with a in view (a');
a sentence encoder keeps a' only if cos(E(a), E(a')) >= tau, else a is used as is; for kept
samples a fusion model merges a and a' into a candidate, every judge scores the candidate's
consistency with a (1-10), up to R rounds, keeping the best average and stopping early once the
average reaches gamma. Output: the fused dataset plus per-sample provenance.

    raftune refine --data demo --limit 64 --mode sdft

``mode="sdft"`` is the SDFT baseline (self-distillation fine-tuning, Yang et al., ACL 2024): the
original model rewrites each answer with the ``sdft`` template, a rewrite that echoes the prompt
(``templates.leaks_prompt``) or is empty falls back to the original answer, and nothing else runs
(no filter, fusion or judges). Same split, logs and files; SFT on its ``fused.jsonl`` is SDFT.

Run folder (``<out_dir>/refine-<hash>``, the hash covering the data and every setting that changes
the output): ``config.json``; ``heldout.jsonl`` (the test split, never refined); ``targets.json``
(the keys to refine, in order); ``records*.jsonl`` (one provenance row per sample, appended batch
by batch and fsynced: the resume log); and once every target is done ``fused.jsonl``,
``summary.json`` and plots, written atomically. Killed at any point and run again with the same
settings, it skips what the logs hold and redoes only the batch that was cut off.

A failed generation is a failure, never an answer. A sample whose rewrite, fusion or judge call
failed after the backend's retries (a server answering 5xx, or 200 with no chat completion) is not
recorded and takes no further part; the run goes on with the other samples, then logs the failed
ones and raises ``GenerationFailed`` (``fused.jsonl`` and the summary wait, as for any missing
sample). The log holding only successful samples, the same command run again retries exactly the
failed ones. A judge reply that is merely unreadable is no failure: it is recorded as unreadable.

``--shard I/N`` refines every N-th target starting at I into ``records.shard-I-of-N.jsonl``; the
shards may run on different machines (each with its own GPU or server) and their logs are joined
by ``raftune merge RUN_DIR``, which restores the original order and checks that none is missing.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import time
from collections import Counter
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from raftune import outputs
from raftune.data import QAExample, examples_to_rows, load_qa, split_train_test
from raftune.files import (
    append_jsonl,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl_log,
    stable_hash,
)
from raftune.generation import (
    DEFAULT_API_KEY_ENV,
    GenerationFailed,
    Generator,
    SamplingParams,
    is_remote_spec,
    open_generator,
    public_specs,
    server_api_key,
)
from raftune.judging import judge_errors, mean_score, score_with_judges
from raftune.models import context_length
from raftune.sequences import special_token_hits, text_ids, warn_special_text
from raftune.settings import (
    CommaList,
    Device,
    Dtype,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    settings,
)
from raftune.similarity import DEFAULT_TAU, SemanticFilter, passes
from raftune.templates import (
    REFINE_TEMPLATES,
    SDFT_TEMPLATES,
    leaks_prompt,
    load_templates,
)

log = logging.getLogger("raftune.refine")

# Settings SDFT never reads: left out of an sdft run's hash, so changing them reuses its folder.
RAFT_ONLY = ("fusion_model", "judges", "encoder", "tau", "rounds", "gamma", "judge_retries",
             "judge_max_new_tokens", "fusion_temperature")


@settings
class RefineConfig:
    data: str = field(metadata={"help": "dataset: 'demo', a JSONL/JSON/CSV/Parquet file, a datasets folder or a hub id"})
    mode: Literal["raft", "sdft"] = field(default="raft", metadata={"help": "raft (rewrite, filter, fuse, judge) or sdft (the SDFT baseline: "
                                                        "the original model's own rewrite, the original answer where it leaks the prompt)"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    model: str = field(default="default", metadata={"help": "the original model pi_0, which rewrites"})
    fusion_model: str | None = field(default=None, metadata={"help": "merges original and rewrite; default: the original model"})
    judges: Annotated[CommaList, Field(min_length=1)] = field(default=("default",), metadata={"help": "judge backends (model specs or http(s)://.../v1#model)"})
    encoder: str = field(default="default", metadata={"help": "sentence encoder of the semantic filter"})
    templates: str | None = field(default=None, metadata={"help": "YAML file overriding prompt templates"})
    tau: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)] = field(default=DEFAULT_TAU, metadata={"help": "similarity threshold (inferred default 0.8)"})
    rounds: Positive = field(default=3, metadata={"help": "fusion rounds R (inferred default 3)"})
    gamma: Annotated[float, Field(ge=1, le=10, allow_inf_nan=False)] = field(default=8.0, metadata={"help": "early-stop average judge score (inferred default 8)"})
    judge_retries: NonNegative = field(default=2, metadata={"help": "re-asks of a judge whose reply holds no score"})
    max_new_tokens: Positive = 256
    judge_max_new_tokens: Positive = 24
    rewrite_temperature: NonNegativeFloat = 0.7
    fusion_temperature: NonNegativeFloat = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    seed: int = 0
    test_fraction: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = field(default=0.1, metadata={"help": "held-out share, never refined"})
    limit: Positive | None = field(default=None, metadata={"help": "refine only the first N training samples"})
    max_input_tokens: Positive | None = field(default=None, metadata={
        "help": "question + answer tokens a sample may have to be refined; a longer one keeps its original answer, "
                "counted as original_too_long (default: the original model's context minus two generations)"})
    question_field: str = "question"
    answer_field: str = "answer"
    messages_field: str = "messages"
    # Execution settings: they change how fast, not what (left out of the run hash).
    batch_size: Positive = 16
    shard: tuple[NonNegative, Positive] = (0, 1)
    device: Device = None
    dtype: Dtype = None
    concurrency: Positive = 8
    timeout_s: PositiveFloat = 120.0
    api_key_env: str = DEFAULT_API_KEY_ENV

    def __post_init__(self):
        if any(map(is_remote_spec, (self.model, self.fusion_model or self.model, *self.judges))):
            server_api_key(self.api_key_env)  # a named key that is not set fails now, not at the first request
        checks = [  # across settings; each setting's own type and range are checked by the annotations
            (self.shard[0] < self.shard[1], f"shard must be I/N with 0 <= I < N, got {self.shard[0]}/{self.shard[1]}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def output_settings(self) -> dict:
        """The settings that determine the refined output (what the run hash covers)."""
        skip = {"out_dir", "limit", "batch_size", "shard", "device", "dtype", "concurrency", "timeout_s", "api_key_env"}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        d["fusion_model"] = self.fusion_model or self.model
        used = SDFT_TEMPLATES if self.mode == "sdft" else REFINE_TEMPLATES
        d["templates"] = {n: t.as_dict() for n, t in load_templates(self.templates).items()  # content, not path
                          if n in used}
        if self.mode == "sdft":
            for k in RAFT_ONLY:
                del d[k]
        else:
            del d["mode"]  # raft runs keep the folder names they had before modes existed
        return public_specs(d)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    return i, n


# --- one batch ------------------------------------------------------------------------------------


def refine_batch(
    batch: list[tuple[int, QAExample]],
    cfg: RefineConfig,
    original: Generator,
    fusion: Generator | None,
    judges: list[Generator],
    sem_filter: SemanticFilter | None,
    templates: dict,
) -> tuple[list[dict], list[dict]]:
    """Provenance records for one batch, and the samples that failed; every generation is batched
    across the batch's samples. In sdft mode only ``original`` is used (the others may be None).

    A sample that needed a generation that failed after the backend's retries (its rewrite, a fusion,
    a judge call: ``Completion.error``) gets no record, only an entry ``{key, index, errors}`` in the
    failures, and takes no further part in the batch. A judge reply that is merely unreadable is no
    failure: it is recorded as unreadable."""
    seed = cfg.seed + int(stable_hash([ex.key for _, ex in batch], 8), 16) % 2**31
    tokens = Counter()
    secs = Counter()

    def gen(backend: Generator, prompts, temperature: float, phase: str, s: int):
        t0 = time.perf_counter()
        outs = backend.chat(prompts, SamplingParams(cfg.max_new_tokens, temperature, cfg.top_p, s))
        secs[phase] += time.perf_counter() - t0
        tokens[phase] += sum(o.completion_tokens for o in outs)
        return outs

    # --- self-conditioned rewrite a' ~ pi_0(. | x, a); SDFT's distillation is this step with its own prompt
    rw = templates["sdft" if cfg.mode == "sdft" else "rewrite"]
    rewrites = gen(original, [rw.render(question=ex.question, answer=ex.answer) for _, ex in batch],
                   cfg.rewrite_temperature, "rewrite", seed)
    errors: list[list[str]] = [[f"rewrite: {r.error}"] if r.error is not None else [] for r in rewrites]
    if cfg.mode == "sdft":
        return _without_failed(batch, _sdft_records(batch, rewrites, secs, tokens), errors)

    # --- semantic filter
    t0 = time.perf_counter()
    has_text = [i for i, r in enumerate(rewrites) if r.text]  # a failed rewrite has none
    sims: list[float | None] = [None] * len(batch)
    for i, s in zip(has_text, sem_filter.similarities([batch[i][1].answer for i in has_text],
                                                      [rewrites[i].text for i in has_text])):
        sims[i] = s
    secs["filter"] += time.perf_counter() - t0
    accepted = [s is not None and passes(s, cfg.tau) for s in sims]

    # --- fusion rounds with multi-judge selection
    candidates: list[list[dict]] = [[] for _ in batch]
    active = [i for i, ok in enumerate(accepted) if ok]
    fu, ju = templates["fuse"], templates["judge"]
    for rnd in range(1, cfg.rounds + 1):
        if not active:
            break
        fused = gen(fusion, [fu.render(question=batch[i][1].question, answer=batch[i][1].answer,
                                       rewrite=rewrites[i].text) for i in active],
                    cfg.fusion_temperature, "fusion", seed + 1000 * rnd)
        for i, f in zip(active, fused):
            if f.error is not None:
                errors[i].append(f"fusion round {rnd}: {f.error}")
        judged = [(i, f.text) for i, f in zip(active, fused) if f.text]  # an empty or failed fusion is not judged
        t0 = time.perf_counter()
        verdicts = score_with_judges(
            judges,
            [ju.render(question=batch[i][1].question, answer=batch[i][1].answer, candidate=text) for i, text in judged],
            max_new_tokens=cfg.judge_max_new_tokens, retries=cfg.judge_retries, seed=seed + 1000 * rnd + 1,
        )
        secs["judge"] += time.perf_counter() - t0
        tokens["judge"] += sum(v.completion_tokens for vs in verdicts for v in vs)
        by_index = dict(zip((i for i, _ in judged), verdicts))
        still = []
        for i, f in zip(active, fused):
            vs = by_index.get(i, [])
            errors[i].extend(f"round {rnd} {e}" for e in judge_errors(vs))
            if errors[i]:
                continue  # failed: no further rounds, no record
            mean = mean_score(vs)
            candidates[i].append({
                "round": rnd, "text": f.text, "finish_reason": f.finish_reason, "mean": mean,
                "verdicts": [dataclasses.asdict(v) for v in vs],
            })
            if mean is None or mean < cfg.gamma:
                still.append(i)
        active = still

    # --- choose and record
    n = len(batch)
    records = []
    for i, (index, ex) in enumerate(batch):
        scored = [c for c in candidates[i] if c["mean"] is not None]
        best = max(scored, key=lambda c: (c["mean"], -c["round"])) if scored else None
        if sims[i] is None:
            source, chosen = "original_no_rewrite", ex.answer  # an empty rewrite (a failed one is not recorded)
        elif not accepted[i]:
            source, chosen = "original_filtered", ex.answer
        elif best is None:
            source, chosen = "original_unjudged", ex.answer  # no judge could score any candidate
        else:
            source, chosen = "fused", best["text"]
        records.append(_record(
            index, ex, source, chosen, rewrite=rewrites[i].text, rewrite_finish_reason=rewrites[i].finish_reason,
            similarity=sims[i], accepted=accepted[i], candidates=candidates[i], rounds_used=len(candidates[i]),
            early_stop=best is not None and best["mean"] >= cfg.gamma, best_mean=best["mean"] if best else None,
            chosen_round=best["round"] if best else None, **_shares(secs, tokens, n)))
    return _without_failed(batch, records, errors)


def _record(index: int, ex: QAExample, source: str, chosen: str, **fields) -> dict:
    """One provenance row. Every mode and exit writes every field (those of steps it never reached
    empty), so that merge and the summary read all rows alike; ``fields`` fill in what was done."""
    return {"key": ex.key, "index": index, "question": ex.question, "answer": ex.answer, "rewrite": "",
            "rewrite_finish_reason": None, "similarity": None, "accepted": False, "candidates": [], "rounds_used": 0,
            "early_stop": False, "best_mean": None, "chosen_round": None, "chosen_source": source, "chosen": chosen,
            "timings_s": {}, "generated_tokens": {}, **fields}


def _shares(secs: Counter, tokens: Counter, n: int) -> dict:
    """The batch's phase times and generated tokens split evenly over its ``n`` samples."""
    return {"timings_s": {k: round(v / n, 4) for k, v in secs.items()},
            "generated_tokens": {k: round(v / n, 1) for k, v in tokens.items()}}


def _without_failed(batch, records: list[dict], errors: list[list[str]]) -> tuple[list[dict], list[dict]]:
    """(the records of the samples whose generations all succeeded, the failed samples with their errors)."""
    failed = [{"key": ex.key, "index": index, "errors": errs} for (index, ex), errs in zip(batch, errors) if errs]
    return [r for r, errs in zip(records, errors) if not errs], failed


def _sdft_records(batch, rewrites, secs: Counter, tokens: Counter) -> list[dict]:
    """SDFT's choice: the rewrite, or the original answer where the rewrite is empty or leaks the
    prompt (a failed rewrite's record is dropped by the caller). The records keep raft's fields
    (filter and fusion ones empty) so merge and summary read both modes alike."""
    n = len(batch)
    records = []
    for (index, ex), rw in zip(batch, rewrites):
        leak = leaks_prompt(rw.text)
        if not rw.text.strip():
            source, chosen = "original_no_rewrite", ex.answer  # empty (a failed one is not recorded)
        elif leak is not None:
            source, chosen = "original_leak", ex.answer
        else:
            source, chosen = "sdft_rewrite", rw.text
        records.append(_record(index, ex, source, chosen, rewrite=rw.text, rewrite_finish_reason=rw.finish_reason,
                               accepted=source == "sdft_rewrite", leak=leak if source == "original_leak" else None,
                               **_shares(secs, tokens, n)))
    return records


# --- the length guard ------------------------------------------------------------------------------

SERVER_CONTEXT = 32_768  # a server's context is not known here: a common size, and a budget that never stalls
CHARS_PER_TOKEN = 3  # a server's tokenizer is not known here either: a cautious estimate of its tokens


def input_budget(cfg: RefineConfig, original: Generator):
    """(budget, count): the tokens a sample's question + answer may take, and a token counter for text.
    The fusion prompt holds the question, the answer and the rewrite, and must leave room for its
    own output: so the model's context minus two generations and the template's words."""
    tok, model = getattr(original, "tokenizer", None), getattr(original, "model", None)
    if tok is not None and model is not None:
        context = context_length(model) or SERVER_CONTEXT

        def count(text: str) -> int:
            return len(text_ids(tok, text))
    else:
        context = SERVER_CONTEXT

        def count(text: str) -> int:
            return len(text) // CHARS_PER_TOKEN + 1
    budget = cfg.max_input_tokens or max(1, context - 2 * cfg.max_new_tokens - 256)

    def fits_and_count(text: str) -> int:
        # a text far beyond the budget is not worth tokenizing (a 1 MB answer takes seconds)
        return budget + 1 if len(text) > 20 * budget else count(text)

    return budget, fits_and_count


def too_long_record(index: int, ex: QAExample, n_tokens: int, budget: int) -> dict:
    """A sample too long to refine: its original answer, unrefined, and why."""
    return _record(index, ex, "original_too_long", ex.answer, input_tokens=n_tokens, input_budget=budget)


# --- the stage ------------------------------------------------------------------------------------


def run_key(cfg: RefineConfig, train: list[QAExample]) -> str:
    """What the run's output depends on: its settings, the data (the samples' keys hash their text) and the
    content of every model it reads (a model replaced at the same path makes another run)."""
    from raftune.models import DEFAULT_ENCODER, embedded_encoder_path

    models = [cfg.model] + ([cfg.fusion_model or cfg.model, *cfg.judges] if cfg.mode == "raft" else [])
    encoder = str(embedded_encoder_path()) if cfg.encoder == DEFAULT_ENCODER else cfg.encoder
    inputs = [outputs.model_fingerprint(m) for m in models] + ([outputs.model_fingerprint(encoder)] if cfg.mode == "raft" else [])
    return stable_hash({"settings": cfg.output_settings(), "data": [ex.key for ex in train], "models": inputs}, 12)


def _load_records(run: Path, own_log: Path | None = None) -> list[dict]:
    """All record logs of the run. Only ``own_log`` (held under our lock) has a cut-off last line
    repaired; another shard's log may be mid-write, so its partial line is just skipped. Every record
    carries the key of the run that wrote it: a log copied in from a run of other settings, data or
    models is refused, never merged (records from before keys were written carry none)."""
    manifest = outputs.read_manifest(run)
    key = manifest["key"] if manifest else None
    rows = []
    for path in sorted(run.glob("records*.jsonl")):
        part = read_jsonl_log(path, repair=path == own_log)
        if key is not None and (other := next((r["run"] for r in part if r.get("run", key) != key), None)):
            raise MergeError(f"{path}: records of another refine run (key {other}; this run's is {key}): it was copied "
                             "from a run of other settings, data or models; take it out of the folder")
        rows.extend(part)
    return rows


def refine(cfg: RefineConfig, progress: bool = True) -> Path:
    """Refine ``cfg.data`` (its training split) and return the run folder."""
    # --- data
    examples, report = load_qa(cfg.data, question_field=cfg.question_field, answer_field=cfg.answer_field,
                               messages_field=cfg.messages_field)
    log.info(report.describe())
    train, heldout = split_train_test(examples, cfg.test_fraction, cfg.seed)
    key = run_key(cfg, train)
    run = Path(cfg.out_dir) / f"refine-{key}"
    # shards of one run share the folder (each holds the lock of its own log), so no folder lock
    outputs.claim(run, "refine", key, other_key="refuse")
    targets = train[: cfg.limit] if cfg.limit else train
    atomic_write_json(run / "config.json", {**public_specs(dataclasses.asdict(cfg)), "resolved": cfg.output_settings(),
                                            "data_report": dataclasses.asdict(report)})
    atomic_write_json(run / "targets.json", [ex.key for ex in targets])
    if not (run / "heldout.jsonl").exists():
        atomic_write_jsonl(run / "heldout.jsonl", examples_to_rows(heldout))

    i_shard, n_shards = cfg.shard
    suffix = "" if n_shards == 1 else f".shard-{i_shard}-of-{n_shards}"
    records_path = run / f"records{suffix}.jsonl"
    with open(records_path, "a") as lock:  # one process per log: a second one would write twice
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the process dies, even by SIGKILL
        except BlockingIOError:
            raise RuntimeError(f"another process is writing {records_path}; wait for it or use another shard") from None
        done = {r["key"] for r in _load_records(run, own_log=records_path)}
        mine = [(i, ex) for i, ex in enumerate(targets) if i % n_shards == i_shard]
        todo = [(i, ex) for i, ex in mine if ex.key not in done]
        log.info("%s: %d targets in this shard, %d already done, %d to do", run, len(mine), len(mine) - len(todo), len(todo))
        failed = _refine_loop(cfg, todo, len(mine), records_path, run, key, progress) if todo else []
    if failed:
        raise _failure(run, failed, len(todo))

    if _all_done(run):
        merge(run)
    else:
        log.info("shard %d/%d done; once every shard is, join them with: raftune merge %s", i_shard, n_shards, run)
    return run


def _refine_loop(cfg: RefineConfig, todo, n_total: int, records_path: Path, run: Path, key: str, progress: bool) -> list[dict]:
    """Refine ``todo`` batch by batch into ``records_path``; returns the samples that failed (not recorded)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from raftune.models import load_encoder

    opts = {"batch_size": cfg.batch_size, "device": cfg.device, "dtype": cfg.dtype, "api_key_env": cfg.api_key_env,
            "concurrency": cfg.concurrency, "timeout_s": cfg.timeout_s}
    original = open_generator(cfg.model, **opts)
    fusion, judges, sem_filter = None, [], None
    if cfg.mode == "raft":  # SDFT needs the original model only: the others would load for nothing
        fusion = open_generator(cfg.fusion_model or cfg.model, **opts)
        judges = [open_generator(j, **opts) for j in cfg.judges]
        sem_filter = SemanticFilter(load_encoder(cfg.encoder, device=cfg.device))
    templates = load_templates(cfg.templates)
    budget, count = input_budget(cfg, original)
    tok = getattr(original, "tokenizer", None)  # None: a server's model, whose tokenizer is not known here
    special = {ex.key for _, ex in todo if special_token_hits(tok, [(ex.question, ex.answer, ex.system)])}
    warn_special_text(log, "refine", len(special), len(todo), server=tok is None)
    backends = list({id(g): g for g in [original, fusion, *judges] if g is not None}.values())

    def cut_replies() -> int:  # server replies cut to max_tokens so far (remote.py), each backend once
        return sum(getattr(g, "cut_replies", 0) for g in backends)

    columns = [TextColumn("refine"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    t_start, n_done, failed = time.perf_counter(), 0, []
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("refine", total=n_total, completed=n_total - len(todo), rate="")
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            t0, cut_before = time.perf_counter(), cut_replies()
            sizes = [count(ex.question) + count(ex.answer) for _, ex in batch]
            long = [too_long_record(i, ex, n, budget) for (i, ex), n in zip(batch, sizes) if n > budget]
            for r in long:
                log.warning("sample %s: %d tokens of question and answer, over the budget of %d: kept unrefined "
                            "(original_too_long)", r["key"], r["input_tokens"], budget)
            fit = [b for b, n in zip(batch, sizes) if n <= budget]
            records, batch_failed = refine_batch(fit, cfg, original, fusion, judges, sem_filter, templates) if fit else ([], [])
            records = long + records
            append_jsonl(records_path, [{**r, "run": key, "special_token_text": r["key"] in special}
                                        for r in records])  # durable before it counts as done
            failed += batch_failed  # not in the log: the next run with the same settings retries them
            for f in batch_failed:
                log.warning("sample %s failed, not recorded: %s", f["key"], "; ".join(f["errors"]))
            dt = time.perf_counter() - t0
            n_done += len(batch)
            rate = n_done / (time.perf_counter() - t_start) * 60
            append_jsonl(run / "metrics.jsonl", [{
                "time": time.time(), "shard": list(cfg.shard), "batch": len(batch), "seconds": round(dt, 3),
                "samples_per_min": round(len(batch) / dt * 60, 2), "accepted": sum(r["accepted"] for r in records),
                "failed": len(batch_failed), "cut_replies": cut_replies() - cut_before,
            }])
            bar.update(task, advance=len(batch), rate=f"{rate:.1f}/min")
    return failed


def _failure(run: Path, failed: list[dict], n_asked: int) -> GenerationFailed:
    keys = [f["key"] for f in failed]
    firsts = list(dict.fromkeys(" ".join(f["errors"][0].split()) for f in failed))[:3]  # one line each
    log.error("%d of %d samples failed and were not recorded; keys: %s%s; first errors:\n  %s", len(failed), n_asked,
              ", ".join(keys[:20]), " ..." if len(keys) > 20 else "", "\n  ".join(firsts))
    return GenerationFailed(
        f"refine: {len(failed)} of {n_asked} samples failed, a generation failing after its retries "
        f"(first: {firsts[0]}); the other {n_asked - len(failed)} are recorded in {run}. "
        f"Run the same command again to retry exactly the failed samples.", run, failed)


def _all_done(run: Path) -> bool:
    targets = json.loads((run / "targets.json").read_text())
    done = {r["key"] for r in _load_records(run)}
    return all(k in done for k in targets)


# --- merge and summary ----------------------------------------------------------------------------


class MergeError(RuntimeError):
    pass


def merge(run: str | Path) -> dict:
    """Join the run's record logs in target order into ``fused.jsonl`` (question, fused
    answer, original answer), ``provenance.jsonl`` (the full records) and the summary; fail, naming the missing keys, if any target has no record."""
    run = Path(run)
    targets = json.loads((run / "targets.json").read_text())
    by_key: dict[str, dict] = {}
    duplicates = 0
    for r in _load_records(run):
        if r["key"] in by_key:
            duplicates += 1  # possible only if two processes ran the same shard without the lock
            continue
        by_key[r["key"]] = r
    missing = [k for k in targets if k not in by_key]
    if missing:
        raise MergeError(f"{run}: {len(missing)} of {len(targets)} samples have no record yet "
                         f"(first: {missing[:3]}); run the missing shards, then merge again")
    records = [by_key[k] for k in targets]
    atomic_write_jsonl(run / "fused.jsonl", [
        {"key": r["key"], "question": r["question"], "answer": r["chosen"], "original_answer": r["answer"],
         "source": r["chosen_source"]} for r in records])
    atomic_write_jsonl(run / "provenance.jsonl", records)
    summary = summarize(records)
    summary["duplicate_records_ignored"] = duplicates
    summary["rows_with_special_token_text"] = sum(bool(r.get("special_token_text")) for r in records)
    # the batches' counts (metrics.jsonl, every shard's): a reply of a server that went far beyond max_tokens
    summary["cut_replies"] = sum(m.get("cut_replies", 0) for m in read_jsonl_log(run / "metrics.jsonl", repair=False))
    summary["run_dir"] = str(run)
    cfg = json.loads((run / "config.json").read_text())
    summary["mode"] = cfg.get("mode", "raft")  # run folders from before modes are raft runs
    atomic_write_json(run / "summary.json", summary)
    if summary["mode"] == "raft":  # the plots show the filter and the judges, which SDFT does not have
        plot_summary(records, summary, cfg["tau"], run)
    if outputs.read_manifest(run) is not None:
        outputs.mark_complete(run)
    return summary


def summarize(records: list[dict]) -> dict:
    n = len(records)
    sims = [r["similarity"] for r in records if r["similarity"] is not None]
    verdict_scores = [v["score"] for r in records for c in r["candidates"] for v in c["verdicts"]]
    readable = [s for s in verdict_scores if s is not None]
    sample_seconds = sum(sum(r["timings_s"].values()) for r in records)
    edges = [round(-1 + 0.1 * i, 1) for i in range(21)]
    return {
        "samples": n,
        "accepted": sum(r["accepted"] for r in records),
        "acceptance_rate": round(sum(r["accepted"] for r in records) / n, 4) if n else 0.0,
        "similarity": {
            "mean": round(sum(sims) / len(sims), 4) if sims else None,
            "histogram": {"edges": edges, "counts": _histogram(sims, edges)},
            "no_rewrite": sum(r["chosen_source"] == "original_no_rewrite" for r in records),
        },
        "judge_scores": {
            "verdicts": len(verdict_scores), "unreadable": len(verdict_scores) - len(readable),
            "distribution": {str(k): v for k, v in sorted(Counter(round(s) for s in readable).items())},
            "best_mean_per_sample": [r["best_mean"] for r in records],
        },
        "rounds_used": {str(k): v for k, v in sorted(Counter(r["rounds_used"] for r in records).items())},
        "early_stops": sum(r["early_stop"] for r in records),
        "chosen_source": dict(Counter(r["chosen_source"] for r in records)),
        "generated_tokens": round(sum(sum(r["generated_tokens"].values()) for r in records)),
        "throughput_samples_per_min": round(n / sample_seconds * 60, 2) if sample_seconds else None,
    }


def _histogram(values: list[float], edges: list[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for v in values:
        b = min(max(int((v - edges[0]) / (edges[1] - edges[0])), 0), len(counts) - 1)
        counts[b] += 1
    return counts


def plot_summary(records: list[dict], summary: dict, tau: float, run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims = [r["similarity"] for r in records if r["similarity"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(sims, bins=summary["similarity"]["histogram"]["edges"], color="#4c72b0")
    ax.axvline(tau, color="#c44e52", linestyle="--", label=f"tau = {tau}")
    ax.set_xlim(min([0.0, tau, *sims]) - 0.05, 1.02)
    ax.set_xlabel("cos(E(original), E(rewrite))")
    ax.set_ylabel("samples")
    ax.set_title(f"Semantic filter: {summary['accepted']}/{summary['samples']} accepted")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "similarity_histogram.png", dpi=120)
    plt.close(fig)

    dist = summary["judge_scores"]["distribution"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar([int(k) for k in dist], list(dist.values()), color="#55a868")
    axes[0].set_xticks(range(1, 11))
    axes[0].set_xlabel("judge score")
    axes[0].set_ylabel("verdicts")
    axes[0].set_title(f"Judge scores ({summary['judge_scores']['unreadable']} unreadable)")
    rounds = summary["rounds_used"]
    axes[1].bar([int(k) for k in rounds], list(rounds.values()), color="#8172b2")
    axes[1].set_xticks(range(max((int(k) for k in rounds), default=0) + 1))
    axes[1].set_xlabel("fusion rounds used (0: filtered out)")
    axes[1].set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(run / "judge_scores.png", dpi=120)
    plt.close(fig)
