"""The command line: flags and YAML map onto configs; bad input ends with a clear message, exit code 2."""
import json
import re

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
