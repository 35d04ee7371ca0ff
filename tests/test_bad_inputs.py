"""Bad input, table-driven: every command refuses it up front with exit code 2 and a message naming the
setting (and where it came from) or the file, and leaves no run folder behind."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from raftune.cli import app

runner = CliRunner()


def flat(text: str) -> str:
    """The output without rich's panel borders and line breaks."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


QA = '{"question": "q1", "answer": "a1"}\n'

# (id, files to write {name: text}, argv with {tmp} for the folder, message fragment)
CASES = [
    # --- settings: types and ranges, from flags
    ("steps-negative", {}, ["train", "--data", "demo", "--max-steps", "-5"], "setting max_steps: must be >= 1, got -5"),
    ("steps-zero", {}, ["train", "--data", "demo", "--max-steps", "0"], "setting max_steps: must be >= 1, got 0"),
    ("lr-negative", {}, ["train", "--data", "demo", "--lr", "-1"], "setting lr: must be > 0.0, got -1.0"),
    ("lr-nan", {}, ["train", "--data", "demo", "--lr", "nan"], "setting lr: must be a finite number"),
    ("set-wrong-type", {}, ["train", "--data", "demo", "--set", "batch_size=abc"],
     "setting batch_size: input should be a valid integer"),
    ("set-unknown-method", {}, ["train", "--data", "demo", "--set", "method=magic"],
     "setting method: input should be 'raft', 'sft'"),
    ("set-unknown-setting", {}, ["train", "--data", "demo", "--set", "top_kk=5"],
     "setting top_kk: unknown setting (did you mean top_k?)"),
    ("yaml-and-set", {"t.yaml": "data: demo\nmax_steps: 3\n"}, ["train", "--config", "{tmp}/t.yaml", "--set", "max_steps=0"],
     "setting max_steps (given by a flag): must be >= 1, got 0"),
    ("device-absent", {}, ["train", "--data", "demo", "--device", "cuda"], "CUDA is not available on this machine"),
    ("dtype-unknown", {}, ["train", "--data", "demo", "--set", "dtype=fp8"], "unknown dtype 'fp8'"),
    ("concurrency-zero", {}, ["refine", "--data", "demo", "--concurrency", "0"], "setting concurrency: must be >= 1, got 0"),
    ("tau-out-of-range", {}, ["refine", "--data", "demo", "--tau", "3"], "setting tau: must be <= 1.0, got 3.0"),
    ("data-missing", {}, ["refine"], "setting data: required, not given"),
    ("eval-batch-zero", {}, ["eval", "--model", "default", "--batch-size", "0"], "setting batch_size: must be >= 1, got 0"),
    ("eval-unknown-suite", {}, ["eval", "--model", "default", "--suite", "domain,nonsense"], "unknown suite(s) ['nonsense']"),
    ("eval-suite-without-data", {}, ["eval", "--model", "default", "--suite", "ifeval"], "suite ifeval needs ifeval_data"),
    # --- settings from a YAML file: the file, line and setting
    ("yaml-train-lr", {"t.yaml": "data: demo\nlr: -0.1\n"}, ["train", "--config", "{tmp}/t.yaml"],
     "t.yaml:2: setting lr: must be > 0.0, got -0.1"),
    ("yaml-list-expected", {"r.yaml": "data: demo\njudges: 5\n"}, ["refine", "--config", "{tmp}/r.yaml"],
     "r.yaml:2: setting judges: expected a list"),
    ("run-methods-string", {"run.yaml": "refine: {data: demo}\nmethods: raft\n"}, ["run", "--config", "{tmp}/run.yaml"],
     "setting methods: expected a list of methods (e.g. [raft, sft]), got str 'raft'"),
    ("run-train-section", {"run.yaml": "refine:\n  data: demo\ntrain:\n  max_steps: 0\n"}, ["run", "--config", "{tmp}/run.yaml"],
     "run.yaml:4: setting train.max_steps: must be >= 1, got 0"),
    ("run-method-variant", {"run.yaml": "refine:\n  data: demo\nmethods:\n  - sft\n  - {name: x, method: raft, top_k: 0}\n"},
     ["run", "--config", "{tmp}/run.yaml"], "run.yaml:5: setting methods.1.top_k: must be >= 1, got 0"),
    ("run-eval-section", {"run.yaml": "refine:\n  data: demo\neval:\n  suites: [domain]\n  batch_size: 0\n"},
     ["run", "--config", "{tmp}/run.yaml"], "run.yaml:5: setting eval.batch_size: must be >= 1, got 0"),
    ("run-set-not-a-yaml-line", {"run.yaml": "refine:\n  data: demo\ntrain:\n  max_steps: 2\n"},
     ["run", "--config", "{tmp}/run.yaml", "--set", "train.max_steps=0"],
     "setting train.max_steps (given by a flag): must be >= 1, got 0"),
    ("run-posthoc-from-unknown", {"run.yaml": "refine: {data: demo}\nmethods: [{name: f, posthoc: fapm, from: sft}]\n"},
     ["run", "--config", "{tmp}/run.yaml"], "'from' must name a trained entry listed before it"),
    # --- data files
    ("data-row-missing-field", {"bad.jsonl": QA + '{"question": "q2"}\n'}, ["refine", "--data", "{tmp}/bad.jsonl"],
     "bad.jsonl:2"),
    ("data-not-json", {"bad.jsonl": QA + "{not json\n"}, ["train", "--data", "{tmp}/bad.jsonl"], "bad.jsonl:2"),
    ("data-absent", {}, ["train", "--data", "{tmp}/nothing.jsonl"], "nothing.jsonl"),
    ("eval-second-suite-data-bad", {"d.jsonl": QA, "if.jsonl": '{"key": 1, "prompt": "p"}\n{oops\n'},
     ["eval", "--model", "default", "--suite", "domain,ifeval", "--domain-data", "{tmp}/d.jsonl", "--ifeval-data",
      "{tmp}/if.jsonl"], "if.jsonl:1: field 'instruction_id_list': missing"),
    ("eval-mmlu-folder-absent", {"d.jsonl": QA}, ["eval", "--model", "default", "--suite", "domain,mmlu", "--domain-data",
                                                   "{tmp}/d.jsonl", "--mmlu-folder", "{tmp}/nomm"], "nomm"),
    # --- compare inputs
    ("compare-invalid-json", {"e/results.json": "{oops"}, ["compare", "{tmp}/e"], "e/results.json: invalid JSON at line 1"),
    ("compare-not-a-result", {"e/results.json": json.dumps([1, 2])}, ["compare", "{tmp}/e"], "e/results.json"),
    ("compare-missing", {}, ["compare", "{tmp}/nowhere"], "nowhere: not found"),
]


@pytest.mark.parametrize("name, files, argv, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_up_front(tmp_path, monkeypatch, name, files, argv, fragment):
    monkeypatch.chdir(tmp_path)  # a run folder made by mistake would land here, under runs/
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write(tmp_path, rel, text)
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if args[0] in ("refine", "train", "eval"):
        args += ["--out-dir", str(tmp_path / "runs")]
    elif args[0] == "compare":
        args += ["--out", str(tmp_path / "runs" / "compare")]
    result = runner.invoke(app, args)
    out = flat(result.output)
    assert result.exit_code == 2, out
    assert flat(fragment) in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "runs").exists()  # nothing was started: no empty run folder left behind
