"""`raftune <command> --help` at 80 columns: every option says what it is and its default, nothing is
cut, and the defaults it states are those of the stage configs."""
import dataclasses
import re

import pytest
import typer
import typer.rich_utils
from typer.testing import CliRunner

from raftune.cli import app
from raftune.evaluate import EvalConfig
from raftune.refine import RefineConfig
from raftune.train import METHODS, TrainConfig

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands  # name -> click command
CONFIGS = {"refine": RefineConfig, "train": TrainConfig, "eval": EvalConfig}
FIELDS = {"judge": "judges", "suite": "suites"}  # flag -> setting, where they differ


def help_text(monkeypatch, *command: str, width: int = 80) -> str:
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", width)  # TERMINAL_WIDTH, as read at import
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.output


def unboxed(text: str) -> str:
    return re.sub(r"[│╭╮╰╯─\s]+", "", text)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_described_whole_at_80_columns(monkeypatch, command):
    text = help_text(monkeypatch, command)
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for param in COMMANDS[command].params:
        assert param.help and param.help.strip(), f"{command} {param.name}: no help"
        # shown whole: rich drops a "[lowercase ...]" as markup, and crops a word wider than its column
        assert unboxed(param.help) in unboxed(text), f"{command} {param.name}: help not shown whole\n{text}"
        shown_default = param.default is not None and param.show_default
        assert param.required or param.is_flag or shown_default or "(default: " in param.help or "required" in param.help, \
            f"{command} {param.name}: no default stated"


def test_command_list_is_not_cut_at_80_columns(monkeypatch):
    text = help_text(monkeypatch)
    assert "…" not in text and all(name in text for name in COMMANDS), text


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_stated_defaults_are_the_configs_own(command):
    fields = {f.name: f for f in dataclasses.fields(CONFIGS[command])}
    checked = 0
    for param in COMMANDS[command].params:
        field = fields.get(FIELDS.get(param.name, param.name))
        stated = re.search(r"\(default: ([^,;)]+)", param.help or "")
        if field is None or field.default in (dataclasses.MISSING, None) or not stated:
            continue  # no setting, or a default that depends on others (checked below for lr)
        default, value = field.default, stated.group(1).strip()
        if isinstance(default, bool):
            assert value == (param.opts[0] if default else param.secondary_opts[0]), param.name
        elif isinstance(default, (int, float)):
            assert float(value) == default, param.name
        elif isinstance(default, tuple):
            assert value == ("/" if param.name == "shard" else ",").join(map(str, default)), param.name
        else:
            assert value == default, param.name
        checked += 1
    assert checked >= 4


def test_learning_rate_default_is_stated_for_both_kinds_of_tuning():
    lr = next(p for p in COMMANDS["train"].params if p.name == "lr")
    full, lora = re.search(r"default: (\S+) full fine-tuning, (\S+) with LoRA", lr.help).groups()
    assert float(full) == TrainConfig(data="x").learning_rate
    assert float(lora) == TrainConfig(data="x", lora=True).learning_rate


@pytest.mark.parametrize("command", ["train", "run"])
def test_method_help_lists_every_method(command):
    method = next(p for p in COMMANDS[command].params if p.name == "method")
    assert set(METHODS) <= set(re.findall(r"\w+", method.help)), method.help


def test_compare_usage_names_its_runs(monkeypatch):
    text = help_text(monkeypatch, "compare")
    assert "{RUN}..." in text and "{runs}" not in text
