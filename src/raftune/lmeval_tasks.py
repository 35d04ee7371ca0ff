"""Local lm-evaluation-harness tasks over the data raftune reads: IFEval and MMLU without the hub.

    from raftune.lmeval_tasks import write_ifeval_task, write_mmlu_task
    folder = "runs/lm-eval-tasks"
    ifeval = write_ifeval_task(folder, "../shared/data/ifeval/input_data.jsonl")        # "ifeval_local"
    mmlu = write_mmlu_task(folder, "../shared/data/mmlu", ["anatomy", "virology"])      # ["mmlu_local_anatomy", ...]
    lm_eval.simple_evaluate(model=..., tasks=[ifeval, *mmlu], task_manager=TaskManager(include_path=folder))
    # or: lm_eval --model hf --model_args pretrained=... --include_path runs/lm-eval-tasks --tasks ifeval_local

Each task YAML ``include``s lm-eval's own task file by its absolute path in the installed package
(``lm_eval/tasks/ifeval/ifeval.yaml``, ``lm_eval/tasks/mmlu/default/_default_template_yaml``) and
replaces only where the documents come from, so the prompt, the generation settings, the
``process_results`` and the metrics are lm-eval's, and follow the installed version. Nothing of
lm-eval's text is copied: a task names the file it includes, its data files and its name.

- IFEval: ``dataset_path: json`` over the user's JSON Lines file as it is (the google-research
  ``input_data.jsonl`` layout the hub's ``google/IFEval`` also has), split ``train`` as on the hub.
- MMLU, one task per subject (``mmlu_local_<subject>``, like lm-eval's ``mmlu_<subject>``): the
  hendrycks CSVs (no header; question, A, B, C, D, answer letter) are read by ``raftune.mmlu``
  (a bad row is an error naming file, line and field) and written beside the task as JSON Lines in
  the hub's ``cais/mmlu`` layout (question, subject, choices, answer index), which lm-eval's template
  reads. Not read by ``datasets``' CSV loader directly: pandas would type a column of numbers (1,026
  of the 57 x 3 x 6 columns here are) and the strings "None", "NA", "nan" as missing unless told,
  and a task YAML cannot give it ``dtype=str``. The description is lm-eval's per-subject sentence
  ("The following are multiple choice questions (with answers) about {subject}.", underscores as
  spaces), which lm-eval writes into each ``mmlu_<subject>.yaml`` and raftune's letter prompt also
  opens with. How the prompts differ from raftune's own MMLU: docs/lm-eval-agreement.md.

A task file this module writes starts with ``MARKER``: it replaces such a file but refuses any
other; a data file is named by a hash of its content and written once. ``limit`` keeps the first N documents in a data file of the task's own (lm-eval's own
``--limit`` does the same at run time, over the whole file).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from raftune.data import DataError, _jsonl_file
from raftune.files import atomic_write_text, stable_hash

MARKER = "# written by raftune.lmeval_tasks: lm-eval's own task over local data\n"
IFEVAL_TASK = "ifeval_local"
MMLU_TASK = "mmlu_local_{subject}"
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def _lm_eval_task_file(*parts: str) -> Path:
    """A task file of the installed lm-eval, by its absolute path (what a local task includes)."""
    try:
        import lm_eval.tasks
    except ImportError:
        raise ImportError("lm-eval is not installed: pip install 'raftune[lm-eval]'") from None
    path = Path(lm_eval.tasks.__file__).resolve().parent.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed lm-eval (its task layout has changed)")
    return path


def _refuse_foreign(path: Path, ours) -> None:
    if path.exists() and (not path.is_file() or not ours(path)):
        raise FileExistsError(f"{path}: exists and was not written by raftune.lmeval_tasks; choose another folder")


def _write_task(folder: Path, name: str, config: dict) -> None:
    """``folder/<name>.yaml``, replacing only a task file this module wrote (it starts with ``MARKER``)."""
    path = folder / f"{name}.yaml"
    _refuse_foreign(path, lambda p: p.read_bytes().startswith(MARKER.encode()))
    atomic_write_text(path, MARKER + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def _write_data(folder: Path, stem: str, rows: list[dict]) -> Path:
    """The rows as JSON Lines in ``folder/<stem>.<hash of the content>.jsonl``: named by its content, a
    file there already holds these rows (a different file is someone else's, refused), so it is written
    once and never replaced."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = folder / f"{stem}.{stable_hash(text)}.jsonl"
    _refuse_foreign(path, lambda p: p.read_text(encoding="utf-8", errors="replace") == text)
    if not path.exists():
        atomic_write_text(path, text)
    return path


def write_ifeval_task(folder: str | Path, input_data: str | Path, limit: int | None = None) -> str:
    """Write lm-eval's ``ifeval`` task over the local IFEval file ``input_data`` into ``folder`` (an
    lm-eval ``include_path``); returns the task's name, ``ifeval_local``.

    The file is checked by ``raftune.ifeval.load_ifeval`` first (a bad line is a ``DataError``
    naming file, line and field, not an error deep inside lm-eval). With ``limit``, the task reads a
    copy of the file's first ``limit`` prompts written beside it.
    """
    from raftune.ifeval import load_ifeval

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    data = Path(os.fspath(input_data)).expanduser().resolve()
    load_ifeval(data)
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if limit is not None:
        rows = [row for _, row in _jsonl_file(data, str(data))][:limit]
        data = _write_data(folder, f"{IFEVAL_TASK}.first{limit}", rows)
    _write_task(folder, IFEVAL_TASK, {
        "include": str(_lm_eval_task_file("ifeval", "ifeval.yaml")),
        "task": IFEVAL_TASK,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(data)}},
        "test_split": "train",
    })
    return IFEVAL_TASK


def _mmlu_rows(questions) -> list[dict]:
    return [{"question": q.question, "subject": q.subject, "choices": list(q.choices), "answer": q.answer}
            for q in questions]


def write_mmlu_task(folder: str | Path, mmlu_folder: str | Path, subjects: list[str], split: str = "test",
                    fewshot_split: str = "dev", limit: int | None = None) -> list[str]:
    """Write lm-eval's ``mmlu`` task (the default, letter form: choices listed, " A" .. " D" scored)
    for each of ``subjects`` of the hendrycks folder ``mmlu_folder`` into ``folder``; returns the task
    names, ``mmlu_local_<subject>``, in the order given.

    ``split`` is evaluated, the first rows of ``fewshot_split`` are the shots (lm-eval's
    ``first_n`` sampler; the shot count is lm-eval's ``num_fewshot``); ``limit`` keeps the first
    ``limit`` questions of each subject's ``split``. Bad rows raise ``DataError`` naming file, line
    and field.
    """
    from raftune.mmlu import load_mmlu

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not subjects:
        raise ValueError("no subjects given")
    if split == fewshot_split:
        raise ValueError(f"split and fewshot_split are both {split!r}: the shots would be the questions asked")
    mmlu_folder = Path(os.fspath(mmlu_folder)).expanduser().resolve()
    folder = Path(folder).expanduser().resolve()
    template = _lm_eval_task_file("mmlu", "default", "_default_template_yaml")
    names = []
    for subject in subjects:
        questions = load_mmlu(mmlu_folder, split, [subject], limit_per_subject=limit)
        shots = load_mmlu(mmlu_folder, fewshot_split, [subject])
        if not questions:
            raise DataError(str(mmlu_folder / split / f"{subject}_{split}.csv"), None, None, "no questions")
        folder.mkdir(parents=True, exist_ok=True)
        name = MMLU_TASK.format(subject=subject)
        files = {which: str(_write_data(folder, f"{name}.{which}", _mmlu_rows(rows)))
                 for which, rows in ((split, questions), (fewshot_split, shots))}
        _write_task(folder, name, {
            "include": str(template),
            "task": name,
            "task_alias": subject,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "test_split": split,
            "fewshot_split": fewshot_split,
            "description": MMLU_DESCRIPTION.format(subject=subject.replace("_", " ")),
        })
        names.append(name)
    return names
