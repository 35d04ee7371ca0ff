"""The ``raftune`` command. It maps flags and YAML onto the stage configs and calls the library.

    raftune refine --data demo --limit 64
    raftune refine --config refine.yaml --shard 1/4
    raftune merge runs/refine-<hash>
    raftune train --data runs/refine-<hash>/fused.jsonl --method raft --lora --max-steps 100
    raftune run --config configs/demo.yaml
    raftune eval --model runs/train-<hash>/model --suite domain,ifeval --domain-data runs/refine-<hash>/heldout.jsonl
    raftune demo --out demo.jsonl
    raftune templates --out templates.yaml
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, NoReturn, Optional

import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Domain fine-tuning that keeps general abilities (RAFT).")
console = Console(stderr=True, soft_wrap=True)  # never break a path or message across lines


def fail(error) -> None:
    """Print an error; its text is escaped, since paths and messages may hold [brackets] that rich reads as markup."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(str(error))}")


def _setup_logging(verbose: bool) -> None:
    """Every record printed once, by one RichHandler: raftune's own from INFO (DEBUG with -v), other
    libraries' from WARNING, also with -v (matplotlib, PIL, fsspec, urllib3 would bury ours in debug lines)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    logging.getLogger("raftune").setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import huggingface_hub.utils.logging  # noqa: F401  (its import gives its logger a stderr handler)
    from transformers.utils import logging as hf_logging

    # huggingface_hub and transformers print through stderr handlers of their own: a hub retry warning
    # came out twice (theirs and ours). Theirs go; their records reach ours.
    logging.getLogger("huggingface_hub").handlers.clear()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars would bury our own progress
    # peft asks transformers for a renamed attribute on every LoRA set-up; nothing a user can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _load_yaml(path: Optional[Path]) -> dict:
    from raftune.settings import YamlError, read_yaml

    if path is None:
        return {}
    try:
        raw = read_yaml(path, "config file")[0] or {}
    except YamlError as e:
        raise typer.BadParameter(str(e)) from None
    if not isinstance(raw, dict):
        raise typer.BadParameter(f"{path}: expected a mapping of settings")
    return raw


RUN_SECTIONS = ("refine", "train", "methods", "eval")  # the sections of a `raftune run` config


def _load_flat(path: Optional[Path], cls) -> dict:
    """The settings of ``cls`` (a stage config) from a flat YAML file; a sectioned `raftune run` config
    is refused with a message that says so, not with one 'unknown setting' per section."""
    raw = _load_yaml(path)
    command = cls.__name__.removesuffix("Config").lower()  # RefineConfig -> refine
    if sections := [k for k in raw if k in RUN_SECTIONS and k not in {f.name for f in dataclasses.fields(cls)}]:
        raise typer.BadParameter(
            f"{path} has sections ({', '.join(sections)}): it is a `raftune run` config; `raftune {command} --config` "
            f"takes a flat file of {command} settings. Run it with `raftune run --config {path}`, or put its "
            f"{command} settings at the top level of a file of their own.")
    return raw


def _key_lines(path: Path) -> dict[str, int]:
    """The line (1-based) of every key of a YAML file, by dotted path: 'train.max_steps', 'methods.2.name'."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[f"{prefix}{k.value}"] = k.start_mark.line + 1
                walk(v, f"{prefix}{k.value}.")
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[f"{prefix}{i}"] = v.start_mark.line + 1
                walk(v, f"{prefix}{i}.")

    from raftune.settings import read_yaml

    walk(read_yaml(path, "config file")[1], "")
    return lines


def config_error(path: Optional[Path], error: Exception, flags: Iterable[str] = ()) -> str:
    """Settings errors located where their values came from: 'FILE:LINE: setting KEY: message' for a
    value of the YAML file, 'setting KEY (given by a flag): message' for one given on the command
    line. A check across settings names no key: it is placed at the most nested key of the file
    that its message names."""
    problems = getattr(error, "problems", None) or [(None, str(error))]
    lines = _key_lines(path) if path is not None else {}
    flags = set(flags)
    out = []
    for key, message in problems:
        if key is None:
            words = set(re.findall(r"[A-Za-z_][\w-]*", message.split("; known:")[0]))  # not the list of valid names
            named = [k for k in lines if k.rsplit(".", 1)[-1] in words and k not in flags]
            key = max(named, key=lambda k: k.count(".")) if named else None
            if key is None:
                out.append(f"{path}: {message}" if path is not None else message)
                continue
        if key in lines and key not in flags:
            out.append(f"{path}:{lines[key]}: setting {key}: {message}")
        else:
            out.append(f"setting {key}{' (given by a flag)' if path is not None else ''}: {message}")
    return "\n".join(out)


def build_config(cls, yaml_path: Optional[Path], **flags):
    """``cls`` from the YAML file's values, overridden by the flags that were given (not None); every
    setting is type-checked (``raftune.settings``) before anything runs."""
    from raftune.settings import build

    values = _load_flat(yaml_path, cls)
    given = {k: v for k, v in flags.items() if v is not None}
    values.update(given)
    try:
        return build(cls, values)
    except ValueError as e:
        raise typer.BadParameter(config_error(yaml_path, e, given)) from None


# Option help shared by several commands. A default is written "(default: X)", never "[X]": rich reads
# "[x]" as markup and drops it. The defaults are those of RefineConfig, TrainConfig and EvalConfig
# (tests/test_cli_help.py checks them).
_MODEL_SPEC = "'default' (the embedded SmolLM2-135M-Instruct), a folder, a .gguf, a hub id or a server http(s)://host:port/v1#model"
_JUDGE_HELP = "a judge (repeat for several): any model that --model takes (default: default)"
_CONFIG_HELP = "flat YAML file of {stage} settings; flags override it; a sectioned config is for `raftune run` (default: none)"
_DEVICE_HELP = "cpu, cuda, cuda:1 or mps (default: auto: cuda, else mps, else cpu)"
_DTYPE_HELP = "bf16, fp16 or fp32 (default: auto: bf16 on CUDA, fp32 elsewhere)"
_VERBOSE_HELP = "debug logging of raftune (other libraries stay at warnings)"
_CONCURRENCY_HELP = "requests in flight per remote server (default: 8)"
_TIMEOUT_HELP = "the most one server request may take, connecting and reading the whole answer, in seconds (default: 120)"
_API_KEY_HELP = ("environment variable holding the servers' API key; one named here must be set (default: RAFTUNE_API_KEY, "
                 "unset for servers without a key)")
# train.METHODS, written out: importing train (torch) would slow every `raftune --help` by seconds;
# tests/test_cli_help.py fails when a method is missing here
_METHODS_HELP = "raft, or a baseline: sft, onpolicy, distill, talr, l2sp, replay (needs replay_data)"


@app.command()
def refine(
    data: Optional[str] = typer.Option(None, help="'demo', a JSONL/JSON/CSV/Parquet file (.gz too), a datasets folder or a hub id "
                                                  "(required, here or in --config)"),
    config: Optional[Path] = typer.Option(None, help=_CONFIG_HELP.format(stage="refine")),
    out_dir: Optional[str] = typer.Option(None, help="parent folder of run folders (default: runs)"),
    model: Optional[str] = typer.Option(None, help=f"original model, which rewrites: {_MODEL_SPEC} (default: default)"),
    fusion_model: Optional[str] = typer.Option(None, help="fusion model: any model that --model takes (default: the original model)"),
    judge: Optional[list[str]] = typer.Option(None, help=_JUDGE_HELP),
    encoder: Optional[str] = typer.Option(None, help="sentence encoder of the semantic filter: a folder or hub id "
                                                     "(default: default, the embedded all-MiniLM-L6-v2)"),
    templates: Optional[str] = typer.Option(None, help="YAML file overriding prompt templates (see `raftune templates`) "
                                                       "(default: the built-in ones)"),
    mode: Optional[str] = typer.Option(None, help="raft, or sdft: the SDFT baseline's data (the model's own rewrites; "
                                                  "one that leaks the prompt keeps the original) (default: raft)"),
    tau: Optional[float] = typer.Option(None, help="similarity threshold of the semantic filter, in [-1, 1] (default: 0.8, inferred)"),
    rounds: Optional[int] = typer.Option(None, help="fusion rounds R (default: 3, inferred)"),
    gamma: Optional[float] = typer.Option(None, help="early-stop average judge score, in [1, 10] (default: 8, inferred)"),
    limit: Optional[int] = typer.Option(None, help="refine only the first N training samples (default: all)"),
    batch_size: Optional[int] = typer.Option(None, help="samples per generation batch (default: 16)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="length cap of rewrites and fusions, in tokens (default: 256)"),
    shard: Optional[str] = typer.Option(None, help="I/N: refine the I-th of N shards, then `raftune merge` (default: 0/1, all)"),
    seed: Optional[int] = typer.Option(None, help="seed of the held-out split and of sampling (default: 0)"),
    question_field: Optional[str] = typer.Option(None, help="the question's field in each record (default: question)"),
    answer_field: Optional[str] = typer.Option(None, help="the answer's field in each record (default: answer)"),
    messages_field: Optional[str] = typer.Option(None, help="the field of a chat (a list of messages), read where a record "
                                                            "has no question and answer (default: messages)"),
    device: Optional[str] = typer.Option(None, help=_DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=_DTYPE_HELP),
    concurrency: Optional[int] = typer.Option(None, help=_CONCURRENCY_HELP),
    timeout_s: Optional[float] = typer.Option(None, help=_TIMEOUT_HELP),
    api_key_env: Optional[str] = typer.Option(None, help=_API_KEY_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Stage 1: rewrite, filter, fuse and judge a QA dataset into its fused version."""
    from raftune.refine import RefineConfig, parse_shard
    from raftune.refine import refine as run_refine

    _setup_logging(verbose)
    _stop_at_first_interrupt()
    try:
        cfg = build_config(
            RefineConfig, config, data=data, out_dir=out_dir, model=model, fusion_model=fusion_model,
            judges=tuple(judge) if judge else None, encoder=encoder, templates=templates, mode=mode, tau=tau, rounds=rounds,
            gamma=gamma, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
            shard=parse_shard(shard) if shard else None, seed=seed, question_field=question_field,
            answer_field=answer_field, messages_field=messages_field, device=device, dtype=dtype,
            concurrency=concurrency, timeout_s=timeout_s, api_key_env=api_key_env,
        )
        t0 = time.perf_counter()
        run = run_refine(cfg)
    except (KeyboardInterrupt, *_stage_errors()) as e:
        _stage_ended(e, saved="the samples refined so far are saved")
    elapsed = time.perf_counter() - t0
    _print_outputs(run, elapsed)


def _print_outputs(run: Path, elapsed: float) -> None:
    import json

    summary_path = run / "summary.json"
    if not summary_path.exists():
        console.print(f"shard finished in {elapsed:.0f} s; records in {run}")
        return
    s = json.loads(summary_path.read_text())
    console.print(
        f"refined {s['samples']} samples in {elapsed:.0f} s: {s['accepted']} rewrites accepted "
        f"({100 * s['acceptance_rate']:.0f}%), sources {s['chosen_source']}, "
        f"{s['judge_scores']['unreadable']} unreadable judge replies"
    )
    print(f"fused data: {run / 'fused.jsonl'}")
    print(f"provenance: {run / 'provenance.jsonl'}")
    print(f"summary:    {summary_path}  (plots: similarity_histogram.png, judge_scores.png)")


@app.command()
def merge(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="a refine run folder holding shard logs")):
    """Join the shard logs of a refine run in the original order; fail if any sample is missing."""
    from raftune.refine import MergeError
    from raftune.refine import merge as run_merge

    _setup_logging(False)
    if not (run_dir / "targets.json").exists():
        fail(f"{run_dir}: not a refine run folder (no targets.json)")
        raise typer.Exit(2)
    try:
        run_merge(run_dir)
    except MergeError as e:
        fail(e)
        raise typer.Exit(2) from None
    _print_outputs(run_dir, 0.0)


def _overrides(items: Optional[list[str]]) -> dict:
    """--set key=value (value parsed as YAML: 1e-4, true, null, [a, b]); dotted keys nest."""
    from raftune.settings import parse_yaml

    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_yaml(value, f"--set {item}", located=False)[0]
    return out


def _dotted(tree: dict, prefix: str = ""):
    """The dotted keys of the leaves of a nested mapping: {'train': {'lr': 1}} -> 'train.lr'."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _dotted(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _deep_update(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def _stage_errors() -> tuple:
    from raftune.data import DataError
    from raftune.models import ModelLoadError
    from raftune.refine import MergeError
    from raftune.templates import TemplateError

    return (DataError, ModelLoadError, TemplateError, MergeError, ValueError, RuntimeError, FloatingPointError)


def _stop_at_first_interrupt() -> None:
    """Make the first Ctrl-C raise ``KeyboardInterrupt`` and ignore the later ones: the command is stopping
    by then, and a second press landing in its clean-up printed a traceback instead of the message."""
    import signal

    def interrupted(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)


def _stage_ended(error: BaseException, saved: str = "the work finished so far is saved") -> NoReturn:
    """End a stage command that raised ``error`` with its exit code: 130 for Ctrl-C (``saved`` says what
    a rerun picks up), 1 for a run that failed (generations failing after their retries), 2 for bad input."""
    from raftune.generation import GenerationFailed

    if isinstance(error, KeyboardInterrupt):
        console.print(f"interrupted: {saved}; run the same command again to resume")
        raise typer.Exit(130) from None
    fail(" ".join(str(error).splitlines()) if isinstance(error, GenerationFailed) else error)
    raise typer.Exit(1 if isinstance(error, GenerationFailed) else 2) from None


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="training data: a refine run's fused.jsonl or any QA source "
                                                  "(required, here or in --config)"),
    method: Optional[str] = typer.Option(None, help=f"{_METHODS_HELP} (default: raft)"),
    config: Optional[Path] = typer.Option(None, help=_CONFIG_HELP.format(stage="train")),
    model: Optional[str] = typer.Option(None, help="the model to tune, also the frozen teacher: 'default' (the embedded "
                                                   "SmolLM2-135M-Instruct), a folder, a .gguf or a hub id (default: default)"),
    out_dir: Optional[str] = typer.Option(None, help="parent folder of run folders (default: runs)"),
    lora: Optional[bool] = typer.Option(None, "--lora/--full", help="LoRA adapters (the teacher: adapters off) or full "
                                                                    "fine-tuning (default: --full)"),
    max_steps: Optional[int] = typer.Option(None, help="optimizer steps (default: as many as --epochs make)"),
    epochs: Optional[float] = typer.Option(None, help="passes over the data, where --max-steps is not given (default: 3)"),
    batch_size: Optional[int] = typer.Option(None, help="samples per micro-batch and process (default: 16)"),
    grad_accum: Optional[int] = typer.Option(None, help="micro-batches per optimizer step (default: 1)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default: 1e-5 full fine-tuning, 2e-4 with LoRA)"),
    eval_data: Optional[str] = typer.Option(None, help="held-out QA data for the domain loss, e.g. a refine run's "
                                                       "heldout.jsonl (default: none)"),
    device: Optional[str] = typer.Option(None, help=_DEVICE_HELP),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="any other setting of TrainConfig, repeatable: "
                                                                 "--set top_k=256 (default: none)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Stage 2: tune a model on the refined data with RAFT (adaptive on-policy distillation) or a baseline."""
    from raftune.train import TrainConfig
    from raftune.train import train as run_train

    _setup_logging(verbose)
    try:
        named = dict(data=data, method=method, model=model, out_dir=out_dir, lora=lora, max_steps=max_steps, epochs=epochs,
                     batch_size=batch_size, grad_accum=grad_accum, lr=lr, eval_data=eval_data, device=device)
        cfg = build_config(TrainConfig, config, **{**_overrides(set_), **{k: v for k, v in named.items() if v is not None}})
        run = run_train(cfg)
    except (KeyboardInterrupt, *_stage_errors()) as e:
        _stage_ended(e, saved="training keeps its last checkpoint (one every save_every steps)")
    print(f"model:   {run / 'model'}")
    print(f"metrics: {run / 'metrics.jsonl'}  (plot: {run / 'training_curves.png'})")


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, help="YAML file with sections refine, train, methods and eval; "
                                                     "flags override it (default: none)"),
    data: Optional[str] = typer.Option(None, help="dataset, refine.data: 'demo', a file, a datasets folder or a hub id "
                                                  "(required, here or in --config)"),
    limit: Optional[int] = typer.Option(None, help="refine and train on the first N training samples, refine.limit "
                                                   "(default: all)"),
    method: Optional[list[str]] = typer.Option(None, help=f"a method to train (repeatable): {_METHODS_HELP} (default: raft)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="any setting as SECTION.KEY=VALUE, repeatable: "
                                                                 "--set train.max_steps=20 (default: none)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Refine, then train every method on the result and report the held-out domain loss."""
    from raftune.pipeline import RunConfig, run_pipeline

    _setup_logging(verbose)
    try:
        overrides = _overrides(set_)
        raw = _deep_update(_load_yaml(config), overrides)
        flagged = set(_dotted(overrides))
        if data is not None or limit is not None:
            raw["refine"] = {**(raw.get("refine") or {}), **({"data": data} if data else {}), **({"limit": limit} if limit else {})}
            flagged |= {k for k, v in (("refine.data", data), ("refine.limit", limit)) if v is not None}
        if method:
            raw["methods"] = list(method)
            flagged |= {"methods"} | {f"methods.{i}" for i in range(len(method))}
        try:
            cfg = RunConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(config_error(config, e, flagged)) from None
        result = run_pipeline(cfg)
    except (KeyboardInterrupt, *_stage_errors(), TypeError) as e:
        _stage_ended(e)
    refine_dir = Path(result["refine_dir"])
    print(f"refine: {refine_dir / 'fused.jsonl'}  (summary: {refine_dir / 'summary.json'})")
    for m, r in result["methods"].items():
        if r.get("posthoc"):
            print(f"{m}: {r['posthoc']} of {r['from']}; model {r['model']}")
        elif r["domain_loss"] is not None:
            print(f"{m}: held-out domain loss {r['base_domain_loss']:.4f} (base) -> {r['domain_loss']:.4f}; model {r['model']}")
        else:
            print(f"{m}: model {r['model']}")
    if "comparison" in result:
        sys.stdout.write("\n" + result["comparison"]["markdown"])
        print(f"comparison: {result['comparison']['dir']}")


def _csv(text: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if text is None else tuple(s.strip() for s in text.split(",") if s.strip())


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, help=f"the model to evaluate: {_MODEL_SPEC} (required, here or in --config)"),
    suite: Optional[str] = typer.Option(None, help="suites, comma-separated (domain,ifeval): domain, ifeval, mmlu, general, "
                                                   "drift, weights, lm-eval (default: domain)"),
    config: Optional[Path] = typer.Option(None, help=_CONFIG_HELP.format(stage="eval")),
    base_model: Optional[str] = typer.Option(None, help="the model before tuning, for drift, weights and pairwise "
                                                        "(default: default)"),
    base_results: Optional[str] = typer.Option(None, help="the base model's results.json: adds retention (default: none)"),
    out_dir: Optional[str] = typer.Option(None, help="parent folder of run folders (default: runs)"),
    name: Optional[str] = typer.Option(None, help="names the run folder eval-<name> (default: eval-<hash>)"),
    domain_data: Optional[str] = typer.Option(None, help="held-out QA data, needed by suite domain: a refine run's "
                                                         "heldout.jsonl (default: none)"),
    domain_limit: Optional[int] = typer.Option(None, help="the first N domain samples (default: all)"),
    judge: Optional[list[str]] = typer.Option(None, help=_JUDGE_HELP),
    ifeval_data: Optional[str] = typer.Option(None, help="IFEval's input_data.jsonl, needed by suite ifeval (default: none)"),
    ifeval_limit: Optional[int] = typer.Option(None, help="the first N IFEval prompts (default: all)"),
    mmlu_folder: Optional[str] = typer.Option(None, help="MMLU folder with dev/ and test/ CSVs, needed by suite mmlu "
                                                         "(default: none)"),
    mmlu_subjects: Optional[str] = typer.Option(None, help="comma-separated subjects (default: all)"),
    mmlu_limit_per_subject: Optional[int] = typer.Option(None, help="the first N questions of each subject (default: all)"),
    mmlu_shots: Optional[int] = typer.Option(None, help="few-shot examples from dev (default: 0)"),
    mmlu_form: Optional[str] = typer.Option(None, help="cloze or letter (default: cloze)"),
    general_data: Optional[str] = typer.Option(None, help="general prompts, needed by suites general and drift: "
                                                          "MT-Bench question.jsonl, AlpacaEval, ... (default: none)"),
    general_limit: Optional[int] = typer.Option(None, help="the first N general prompts (default: all)"),
    general_mode: Optional[str] = typer.Option(None, help="score (1-10 per answer) or pairwise (vs the base model) "
                                                          "(default: score)"),
    general_aggregate: Optional[str] = typer.Option(None, help="combining the judges: mean or majority (default: mean)"),
    templates: Optional[str] = typer.Option(None, help="YAML file overriding judge templates (see `raftune templates`) "
                                                       "(default: the built-in ones)"),
    lm_eval_task: Optional[list[str]] = typer.Option(None, help="an lm-eval task, group or tag (repeat for several), "
                                                               "needed by suite lm-eval: one of lm-eval's (arc_easy, "
                                                               "gsm8k, ...) or of --lm-eval-include-path (default: none)"),
    lm_eval_num_fewshot: Optional[int] = typer.Option(None, help="few-shot examples in every lm-eval task (default: "
                                                                 "each task's own)"),
    lm_eval_limit: Optional[int] = typer.Option(None, help="the first N documents of each lm-eval task (default: all)"),
    lm_eval_include_path: Optional[str] = typer.Option(None, help="a folder of your own lm-eval task YAMLs. It is code: "
                                                                  "its prompt templates run unsandboxed; pass only a "
                                                                  "folder you trust (default: none)"),
    lm_eval_chat: bool = typer.Option(False, "--lm-eval-chat", help="apply the chat template to lm-eval's prompts "
                                                                    "(default: where the tokenizer has one)"),
    no_lm_eval_chat: bool = typer.Option(False, "--no-lm-eval-chat", help="plain prompts, no chat template"),
    lm_eval_trust_code: bool = typer.Option(False, "--lm-eval-trust-code",
                                            help="run the Python a task folder names (!function outside lm-eval's "
                                                 "package) and tasks lm-eval marks unsafe (they run model output)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="length cap of generated answers, in tokens (default: 256)"),
    batch_size: Optional[int] = typer.Option(None, help="samples per batch (default: 16)"),
    device: Optional[str] = typer.Option(None, help=_DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=_DTYPE_HELP),
    concurrency: Optional[int] = typer.Option(None, help=_CONCURRENCY_HELP),
    timeout_s: Optional[float] = typer.Option(None, help=_TIMEOUT_HELP),
    api_key_env: Optional[str] = typer.Option(None, help=_API_KEY_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Evaluate a model: D-Acc, IFEval, MMLU, judged general QA, drift, weight distance, retention."""
    import json

    from raftune.evaluate import EvalConfig, evaluate

    _setup_logging(verbose)
    _stop_at_first_interrupt()
    if model is None and "model" not in _load_flat(config, EvalConfig):
        raise typer.BadParameter("--model is required: 'default', a model folder, a .gguf file, a hub id or a server")
    if lm_eval_chat and no_lm_eval_chat:
        raise typer.BadParameter("--lm-eval-chat and --no-lm-eval-chat: pass one of them")
    lm_eval = {k: v for k, v in dict(tasks=tuple(lm_eval_task) if lm_eval_task else None, num_fewshot=lm_eval_num_fewshot,
                                     limit=lm_eval_limit, include_path=lm_eval_include_path,
                                     chat=True if lm_eval_chat else False if no_lm_eval_chat else None,
                                     trust_code=lm_eval_trust_code or None).items() if v is not None}
    if lm_eval:  # the flags override the config's lm_eval mapping setting by setting
        in_config = _load_flat(config, EvalConfig).get("lm_eval")
        lm_eval = {**(in_config if isinstance(in_config, dict) else {}), **lm_eval}
    try:
        cfg = build_config(
            EvalConfig, config, model=model, suites=_csv(suite), base_model=base_model, base_results=base_results,
            out_dir=out_dir, name=name, domain_data=domain_data, domain_limit=domain_limit,
            judges=tuple(judge) if judge else None, ifeval_data=ifeval_data, ifeval_limit=ifeval_limit,
            mmlu_folder=mmlu_folder, mmlu_subjects=_csv(mmlu_subjects), mmlu_limit_per_subject=mmlu_limit_per_subject,
            mmlu_shots=mmlu_shots, mmlu_form=mmlu_form, general_data=general_data, general_limit=general_limit,
            general_mode=general_mode, general_aggregate=general_aggregate, templates=templates,
            max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, dtype=dtype, concurrency=concurrency,
            timeout_s=timeout_s, api_key_env=api_key_env, lm_eval=lm_eval or None,
        )
        run = evaluate(cfg)
    except (KeyboardInterrupt, *_stage_errors()) as e:
        _stage_ended(e, saved="the answers and judge replies so far are saved")
    results = json.loads((run / "results.json").read_text())
    for suite_name, summary in results["suites"].items():
        if suite_name == "lm-eval":  # per task, lm-eval's metric names: the numbers, and their stderrs beside them
            summary = summary.get("metrics", {})
        shown = {k: v for k, v in summary.items() if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
        print(f"{suite_name}: " + ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.4g}' if isinstance(v, float) else v}" for k, v in shown.items()))
    for metric, r in results.get("retention", {}).items():
        ret = "n/a" if r["retention"] is None else f"{100 * r['retention']:.1f}%"
        print(f"retention {metric}: {ret}")
    print(f"results: {run / 'results.json'}  (per sample: {', '.join(s + '.jsonl' for s in results['suites'])})")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., metavar="RUN", help="eval run folders (or their results.json), one or more"),
    label: Optional[list[str]] = typer.Option(None, help="a label per run, in order (label runs base and sft for retention "
                                                         "and deltas) (default: the folder names without eval-)"),
    out: Path = typer.Option(Path("runs/compare"), help="folder for comparison.md, comparison.json and plots"),
):
    """Evaluation runs side by side: Table 1 (scores, change vs SFT) and Table 4 (retention vs base)."""
    from raftune.compare import compare as run_compare

    _setup_logging(False)
    try:
        table = run_compare(runs, label, out)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
        raise typer.Exit(2) from None
    sys.stdout.write(table["markdown"])
    print(f"\nwritten: {out / 'comparison.md'}, {out / 'comparison.json'}" + "".join(f", {p}" for p in table["plots"]))


def _cannot_write(path: Path, error: OSError) -> NoReturn:
    if isinstance(error, IsADirectoryError):
        reason = "it is a folder; give a file name"
    elif isinstance(error, (FileExistsError, NotADirectoryError)):  # mkdir of the parents met a file
        reason = "a part of its folder path is a file, not a folder"
    else:
        reason = error.strerror or str(error)
    fail(f"cannot write {path}: {reason}")
    raise typer.Exit(2) from None


def _write_new(out: Path, text: str) -> None:
    """Write ``text`` to ``out``: a new file, or one that holds exactly ``text`` already. A file with other
    content (a user's edited templates, another dataset) is refused, never overwritten: a single file
    carries no manifest that would say raftune wrote it."""
    from raftune.files import atomic_write_text

    if out.is_file() and out.read_bytes() != text.encode("utf-8"):
        fail(f"{out}: exists with other content; it is left as it is: give another path, or move it away first")
        raise typer.Exit(2)
    try:
        atomic_write_text(out, text)  # creates the missing folders
    except OSError as e:
        _cannot_write(out, e)


@app.command()
def demo(out: Path = typer.Option(Path("demo.jsonl"), help="where to write the demo dataset (missing folders are created; "
                                                          "an existing file of other content is refused)")):
    """Write the built-in demo domain (Python standard library QA) as JSONL."""
    import json

    from raftune.demo import build_demo

    rows = build_demo()
    _write_new(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} question/answer pairs to {out}")


@app.command("templates")
def templates_cmd(
    out: Optional[Path] = typer.Option(None, help="write the templates to this YAML file, creating missing folders; "
                                                  "an existing file of other content is refused (default: print them)"),
    templates: Optional[str] = typer.Option(None, help="a YAML file of overrides, shown applied (default: none)"),
):
    """Show the prompt templates (refine: rewrite, fuse, judge; eval: domain_judge, general_judge, pairwise_judge);
    edit the YAML and pass it with --templates to `refine` or `eval`."""
    from raftune.templates import TemplateError, dump_templates, load_templates

    try:
        text = dump_templates(load_templates(templates))
    except TemplateError as e:
        fail(e)
        raise typer.Exit(2) from None
    if out:
        _write_new(out, text)
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)


_BASE_HELP = "the model before tuning: 'default' (embedded SmolLM2-135M-Instruct), a folder, a .gguf or a hub id"
_TUNED_HELP = "the model folder a `raftune train` run wrote (runs/train-<hash>/model): a full model or a LoRA adapter"


@app.command()
def fapm(
    tuned: str = typer.Option(..., help=_TUNED_HELP),
    out: Path = typer.Option(..., help="folder for the pruned model: new, empty, or an earlier fapm output (replaced); "
                                       "any other folder is refused"),
    base: str = typer.Option("default", help=_BASE_HELP),
    keep: float = typer.Option(0.1, help="fraction of each parameter's change W_ft - W_0 kept, in (0, 1]"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """FAPM: keep the changes of each parameter that least risk forgetting, prune the rest back to the base."""
    from raftune.posthoc import fapm as run_fapm

    _setup_logging(verbose)
    try:
        folder = run_fapm(base, tuned, str(out), keep=keep)
    except _stage_errors() as e:
        fail(e)
        raise typer.Exit(2) from None
    print(f"model: {folder}")


@app.command()
def wise(
    tuned: str = typer.Option(..., help=_TUNED_HELP),
    out: Path = typer.Option(..., help="parent folder of one model folder wise-<alpha> per alpha (an earlier wise output "
                                       "there is replaced; any other folder of that name is refused)"),
    base: str = typer.Option("default", help=_BASE_HELP),
    alpha: list[float] = typer.Option([0.5], help="weight a of the tuned model in (1 - a) W_0 + a W_ft, in [0, 1] (repeatable)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """WiSE-FT: average the base and the tuned weights, one model per alpha."""
    from raftune.posthoc import wise as run_wise

    _setup_logging(verbose)
    try:
        folders = run_wise(base, tuned, str(out), alpha)
    except _stage_errors() as e:
        fail(e)
        raise typer.Exit(2) from None
    for a, folder in zip(dict.fromkeys(alpha), folders):
        print(f"alpha {a:g}: {folder}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
