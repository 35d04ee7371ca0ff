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


def write(tmp_path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


QA = '{"question": "q1", "answer": "a1"}\n'
# nine levels of nine aliases: 9**9 strings once expanded, a few hundred bytes written
LAUGHS = 'data: demo\nlol: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"l{i}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
DEEP = "data: demo\n" + "".join(" " * i + f"k{i}:\n" for i in range(100)) + " " * 100 + "x: 1\n"
CONFIG = '{"model_type": "llama", "vocab_size": 8, "hidden_size": 4}'


def _safetensors(cut: int = 0) -> bytes:
    """One 4-float tensor in the safetensors layout, ``cut`` bytes short of it (a copy that stopped)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    whole = len(header).to_bytes(8, "little") + header + bytes(16)
    return whole[: len(whole) - cut]


NO_WEIGHTS = {"m/config.json": CONFIG}
CUT_WEIGHTS = {"m/config.json": CONFIG, "m/model.safetensors": _safetensors(cut=8)}
BAD_CONFIG = {"m/config.json": '{"model_type": "llama",', "m/model.safetensors": _safetensors()}
TEMPLATES_CONVERSION = {"t.yaml": "domain_judge:\n  user: '{question!r} {answer} {candidate}'\n"}

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
    # --- YAML files and values: read within bounds (1 MiB, 32 levels, 20,000 values with aliases expanded)
    ("yaml-billion-laughs", {"t.yaml": LAUGHS}, ["train", "--config", "{tmp}/t.yaml"],
     "t.yaml: line 6: over 20000 values (aliases expanded)"),
    ("run-yaml-billion-laughs", {"run.yaml": LAUGHS.replace("data: demo", "refine: {data: demo}")},
     ["run", "--config", "{tmp}/run.yaml"], "run.yaml: line 6: over 20000 values"),
    ("yaml-deep-nesting", {"r.yaml": DEEP}, ["refine", "--config", "{tmp}/r.yaml"], "r.yaml: line 34: nested over 32 levels deep"),
    ("yaml-huge", {"e.yaml": "model: default\n# " + "x" * (1 << 20) + "\n"}, ["eval", "--config", "{tmp}/e.yaml"],
     "e.yaml: over 1 MiB, too big for a config file"),
    ("yaml-not-utf8", {"t.yaml": "data: demo\nname: caf\xe9\n".encode("latin-1")}, ["train", "--config", "{tmp}/t.yaml"],
     "t.yaml: not UTF-8 text (line 2: byte 0xe9 at offset 20)"),
    ("config-is-a-folder", {"cfg/x": ""}, ["train", "--config", "{tmp}/cfg"], "cfg: is a folder, not a config file"),
    ("eval-config-is-a-folder", {"cfg/x": ""}, ["eval", "--model", "default", "--config", "{tmp}/cfg"],
     "cfg: is a folder, not a config file"),
    ("run-config-is-a-folder", {"cfg/x": ""}, ["run", "--config", "{tmp}/cfg"], "cfg: is a folder, not a config file"),
    ("set-not-yaml", {}, ["train", "--data", "demo", "--set", "lr=["], "--set lr=[: not valid YAML"),
    ("run-set-not-yaml", {}, ["run", "--data", "demo", "--set", "train.lr=["], "--set train.lr=[: not valid YAML"),
    ("yaml-python-tag", {"t.yaml": "data: !!python/object/apply:os.system ['touch pwned']\n"},
     ["train", "--config", "{tmp}/t.yaml"], "t.yaml: not valid YAML: line 1, column 7: could not determine a constructor"),
    # --- templates: a folder, too big, placeholders other than plain {name}
    ("templates-is-a-folder", {"tdir/x": ""}, ["refine", "--data", "demo", "--templates", "{tmp}/tdir"],
     "tdir: is a folder, not a template file"),
    ("eval-templates-is-a-folder", {"tdir/x": ""}, ["eval", "--model", "default", "--suite", "domain", "--domain-data",
                                                     "demo", "--templates", "{tmp}/tdir"], "tdir: is a folder, not a template file"),
    ("templates-billion-laughs", {"t.yaml": LAUGHS.replace("data: demo", "rewrite: {user: '{question} {answer}'}")},
     ["refine", "--data", "demo", "--templates", "{tmp}/t.yaml"], "t.yaml: line 6: over 20000 values"),
    ("templates-format-spec", {"t.yaml": "rewrite:\n  user: '{question} {answer:>999999999}'\n"},
     ["refine", "--data", "demo", "--templates", "{tmp}/t.yaml"],
     "t.yaml: template 'rewrite': placeholder {answer:>999999999} has a format spec :>999999999"),
    ("eval-templates-conversion", TEMPLATES_CONVERSION, ["eval", "--model", "default", "--domain-data", "demo",
                                                         "--templates", "{tmp}/t.yaml"],
     "t.yaml: template 'domain_judge': placeholder {question!r} has a conversion !r"),
    # --- damaged models: checked before any folder is made or any weight read
    ("train-model-no-weights", NO_WEIGHTS, ["train", "--data", "demo", "--model", "{tmp}/m"],
     "m: config.json but no weights (none of model.safetensors"),
    ("refine-model-no-weights", NO_WEIGHTS, ["refine", "--data", "demo", "--model", "{tmp}/m"], "m: config.json but no weights"),
    ("eval-model-no-weights", NO_WEIGHTS, ["eval", "--model", "{tmp}/m", "--domain-data", "demo"], "m: config.json but no weights"),
    ("train-model-truncated", CUT_WEIGHTS, ["train", "--data", "demo", "--model", "{tmp}/m"],
     f"m/model.safetensors: truncated or damaged: {len(_safetensors(cut=8))} bytes, its header describes "
     f"{len(_safetensors())}"),
    ("refine-judge-truncated", CUT_WEIGHTS, ["refine", "--data", "demo", "--judge", "{tmp}/m"],
     "m/model.safetensors: truncated or damaged"),
    ("eval-model-truncated", CUT_WEIGHTS, ["eval", "--model", "{tmp}/m", "--domain-data", "demo"],
     "m/model.safetensors: truncated or damaged"),
    ("train-model-bad-config", BAD_CONFIG, ["train", "--data", "demo", "--model", "{tmp}/m"],
     "m/config.json: not valid JSON (line 1, column 24"),
    ("eval-base-model-bad-config", BAD_CONFIG, ["eval", "--model", "default", "--suite", "weights", "--base-model", "{tmp}/m"],
     "m/config.json: not valid JSON"),
    ("train-model-a-file", {"w.bin": b"\0" * 64}, ["train", "--data", "demo", "--model", "{tmp}/w.bin"],
     "w.bin: a file, not a model folder or a .gguf file"),
    ("eval-model-a-file", {"w.bin": b"\0" * 64}, ["eval", "--model", "{tmp}/w.bin", "--domain-data", "demo"],
     "w.bin: a file, not a model folder or a .gguf file"),
    ("train-model-not-gguf", {"m.gguf": "hello"}, ["train", "--data", "demo", "--model", "{tmp}/m.gguf"],
     "m.gguf: not a GGUF file"),
    ("fapm-tuned-truncated", CUT_WEIGHTS, ["fapm", "--tuned", "{tmp}/m", "--out", "{tmp}/runs/fapm"],
     "m/model.safetensors: truncated or damaged"),
    ("wise-tuned-no-weights", NO_WEIGHTS, ["wise", "--tuned", "{tmp}/m", "--out", "{tmp}/runs/wise"],
     "m: config.json but no weights"),
    ("fapm-tuned-bad-config", BAD_CONFIG, ["fapm", "--tuned", "{tmp}/m", "--out", "{tmp}/runs/fapm"],
     "m/config.json: not valid JSON"),
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
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "runs").exists()  # nothing was started: no empty run folder left behind
