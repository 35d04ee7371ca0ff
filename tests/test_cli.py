"""The command line: flags and YAML map onto configs; bad input ends with a clear message, exit code 2;
a failed run exits 1, an interrupted one 130."""
import json
import logging
import re

import pytest
from typer.testing import CliRunner

from raftune.cli import app

runner = CliRunner()


def test_bad_row_is_named_by_file_line_and_field(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2", "answer": ""}\n')
    result = runner.invoke(app, ["refine", "--data", str(data), "--out-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "qa.jsonl:2" in out and "answer" in out
    assert not (tmp_path / "runs").exists()  # failed before any work, nothing half-written


def test_error_text_with_brackets_is_printed_as_is(tmp_path):
    """A message holding rich markup ("[/red]") must not crash the error printer."""
    data = tmp_path / "odd[/red]name.jsonl"  # a folder "odd[" holding "red]name.jsonl"
    data.parent.mkdir()
    data.write_text('{"question": "q1", "answer": ""}\n')
    result = runner.invoke(app, ["refine", "--data", str(data), "--out-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "odd[/red]name.jsonl:1" in "".join(result.output.split()), result.output


def test_yaml_config_with_unknown_setting(tmp_path):
    cfg = tmp_path / "refine.yaml"
    cfg.write_text("data: demo\ntua: 0.5\n")
    result = runner.invoke(app, ["refine", "--config", str(cfg)])
    assert result.exit_code == 2 and unboxed(f"{cfg}:2: setting tua: unknown setting (did you mean tau?)") in unboxed(result.output)
    cfg.write_text("data: demo\ntau: 3\n")  # a bad value is located too
    result = runner.invoke(app, ["refine", "--config", str(cfg)])
    assert result.exit_code == 2 and unboxed(f"{cfg}:2: setting tau: must be <= 1.0, got 3") in unboxed(result.output)


def unboxed(text: str) -> str:
    """``text`` without the frame and line breaks of typer's error box, and without spaces."""
    return re.sub(r"[│╭╮╰╯─\s]+", "", text)


def test_invalid_values_are_refused(tmp_path):
    for args, text in [(["--tau", "3"], "setting tau: must be <= 1.0, got 3.0"), (["--shard", "4/4"], "shard must be I/N"),
                       (["--shard", "x"], "must look like I/N")]:
        result = runner.invoke(app, ["refine", "--data", "demo", *args])
        assert result.exit_code == 2 and text in " ".join(result.output.split()), result.output


def test_merge_of_a_folder_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["merge", str(tmp_path)])
    assert result.exit_code == 2 and "not a refine run folder" in result.output


def test_templates_and_demo_commands(tmp_path):
    out = tmp_path / "t.yaml"
    assert runner.invoke(app, ["templates", "--out", str(out)]).exit_code == 0
    assert "reply_prefix: 'Score:'" in out.read_text()
    demo = tmp_path / "demo.jsonl"
    result = runner.invoke(app, ["demo", "--out", str(demo)])
    assert result.exit_code == 0
    rows = [json.loads(l) for l in demo.read_text().splitlines()]
    assert len(rows) >= 1000 and {"question", "answer"} <= set(rows[0])


# --- what a run says when it is interrupted, fails or logs; config files of the wrong kind


@pytest.fixture(autouse=True)
def _logging_restored():
    """The commands set up logging for a process (root handler, levels); the tests after these keep theirs."""
    names = ("", "raftune", "huggingface_hub", "transformers")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    yield
    for n, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)


RUN_CONFIG = "refine:\n  data: demo\n  limit: 8\ntrain:\n  max_steps: 2\nmethods: [raft, sft]\n"


@pytest.mark.parametrize("command", ["refine", "train", "eval"])
def test_a_run_config_given_to_a_stage_says_to_use_run(tmp_path, command):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(RUN_CONFIG)
    result = runner.invoke(app, [command, "--config", str(cfg)])
    out = unboxed(result.output)
    assert result.exit_code == 2, result.output
    assert unboxed(f"`raftune {command} --config` takes a flat file of {command} settings") in out, result.output
    assert unboxed(f"raftune run --config {cfg}") in out and "unknownsetting" not in out


def test_templates_out_creates_missing_folders_and_refuses_a_file_in_the_way(tmp_path):
    out = tmp_path / "new" / "folder" / "t.yaml"
    result = runner.invoke(app, ["templates", "--out", str(out)])
    assert result.exit_code == 0 and "reply_prefix: 'Score:'" in out.read_text()
    result = runner.invoke(app, ["templates", "--out", str(out / "x.yaml")])  # t.yaml is a file, not a folder
    assert result.exit_code == 2, result.output  # no traceback: that would be exit 1
    assert unboxed(f"cannot write {out / 'x.yaml'}: a part of its folder path is a file") in unboxed(result.output)


STAGES = {  # command line, and the stage function it calls
    "refine": (["refine", "--data", "demo"], "raftune.refine.refine"),
    "train": (["train", "--data", "fused.jsonl"], "raftune.train.train"),
    "eval": (["eval", "--model", "default", "--domain-data", "heldout.jsonl"], "raftune.evaluate.evaluate"),
    "run": (["run", "--data", "demo"], "raftune.pipeline.run_pipeline"),
}


@pytest.mark.parametrize("command", sorted(STAGES))
def test_ctrl_c_says_what_is_saved_and_exits_130(monkeypatch, command):
    args, target = STAGES[command]

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    [line] = [l for l in result.output.splitlines() if l.strip()]
    assert line.startswith("interrupted: ") and line.endswith("run the same command again to resume"), line


def test_failed_generations_exit_1_with_one_line(monkeypatch):
    from raftune.generation import GenerationFailed

    def failing(cfg, **kw):
        raise GenerationFailed("refine: 2 of 8 samples failed\n(first: HTTP 503)", "runs/refine-x", [])

    monkeypatch.setattr("raftune.refine.refine", failing)
    result = runner.invoke(app, ["refine", "--data", "demo"])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == "error: refine: 2 of 8 samples failed (first: HTTP 503)"


def test_train_logs_its_processes_in_words(tmp_path, tiny_model_dir):
    data = tmp_path / "fused.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}."}) + "\n" for i in range(4)))
    result = runner.invoke(app, ["train", "--method", "sft", "--data", str(data), "--model", str(tiny_model_dir), "--out-dir",
                                 str(tmp_path / "runs"), "--max-steps", "1", "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "sft on cpu, 1 process" in result.output and "process(es)" not in result.output, result.output


def reached_handlers(name: str) -> list[logging.Handler]:
    """The handlers a record of logger ``name`` goes through, but pytest's own: pytest 9 attaches its capture
    handlers to every logger that does not propagate when a test phase starts (transformers' logger, where
    another test module imported transformers at collection), and they are gone when the phase ends."""
    logger, found = logging.getLogger(name), []
    while logger is not None:
        found += [h for h in logger.handlers if type(h).__module__ != "_pytest.logging"]
        logger = logger.parent if logger.propagate else None
    return found


def test_verbose_is_raftune_debug_only_and_every_record_prints_once():
    from raftune.cli import _setup_logging

    _setup_logging(verbose=True)
    assert logging.getLogger("raftune.train").isEnabledFor(logging.DEBUG)
    for lib in ("matplotlib", "matplotlib.font_manager", "PIL.PngImagePlugin", "fsspec", "urllib3", "httpx"):
        assert not logging.getLogger(lib).isEnabledFor(logging.INFO), lib
    # a hub retry warning went through huggingface_hub's own stderr handler and ours
    for name in ("huggingface_hub.utils._http", "transformers.modeling_utils", "raftune.train"):
        assert len(reached_handlers(name)) == 1, (name, reached_handlers(name))
    _setup_logging(verbose=False)
    assert logging.getLogger("raftune.train").isEnabledFor(logging.INFO)
    assert not logging.getLogger("raftune.train").isEnabledFor(logging.DEBUG)
