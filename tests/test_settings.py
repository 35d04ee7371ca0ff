"""The one YAML reader: safe_load's values, bounded in time and memory whatever the file holds."""
from __future__ import annotations

import time

import pytest

from raftune.settings import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, YamlError, parse_yaml, read_yaml

# nine levels of nine aliases: 9**9 (387 million) strings once expanded
LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def nested_block(levels: int) -> str:
    return "".join(" " * i + f"k{i}:\n" for i in range(levels)) + " " * levels + "x: 1\n"


@pytest.mark.parametrize("name, content, message", [
    ("laughs.yaml", LAUGHS, f"laughs.yaml: line 5: over {MAX_YAML_NODES} values (aliases expanded)"),
    ("self.yaml", "a: &a [1, *a]\n", "self.yaml: line 1: alias *a is inside the value it names"),
    ("deep.yaml", nested_block(200), f"deep.yaml: line {MAX_YAML_DEPTH + 1}: nested over {MAX_YAML_DEPTH} levels deep"),
    ("flow.yaml", "a: " + "[" * 500_000 + "]" * 500_000, "flow.yaml: "),  # libyaml stops it at 1000 levels, we at 32
    ("many.yaml", "a: [" + ", ".join(["1"] * 300_000) + "]\n", f"over {MAX_YAML_NODES} values"),
    ("huge.yaml", "# " + "x" * MAX_YAML_BYTES + "\nlr: 1\n", "huge.yaml: over 1 MiB, too big for a config file"),
    ("latin1.yaml", "lr: caf\xe9\n".encode("latin-1"), "latin1.yaml: not UTF-8 text (line 1: byte 0xe9 at offset 7)"),
    ("tag.yaml", "a: !!python/object/apply:os.system ['touch pwned']\n", "tag.yaml: not valid YAML: line 1, column 4: "
                                                                          "could not determine a constructor"),
    ("bad.yaml", "lr: [\n", "bad.yaml: not valid YAML: line "),
])
def test_files_over_the_bounds_are_refused_fast_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    t0 = time.perf_counter()
    with pytest.raises(YamlError) as e:
        read_yaml(path, "config file")
    assert time.perf_counter() - t0 < 0.5, "refused, but not in bounded time"
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_a_folder_and_a_missing_file_are_named(tmp_path):
    (tmp_path / "cfg").mkdir()
    with pytest.raises(YamlError, match=r"cfg: is a folder, not a config file"):
        read_yaml(tmp_path / "cfg", "config file")
    with pytest.raises(YamlError, match=r"nope.yaml: no such template file"):
        read_yaml(tmp_path / "nope.yaml", "template file")


def test_what_a_config_uses_reads_as_safe_load_reads_it(tmp_path):
    """Anchors, aliases and merge keys within the bounds, and the node tree that gives each key's line."""
    text = ("base: &base {lr: 1e-4, top_k: 8}\n"
            "methods:\n  - <<: *base\n    name: a\n  - <<: *base\n    name: b\n"
            + nested_block(MAX_YAML_DEPTH - 1))  # as deep as allowed
    value, node = parse_yaml(text, "run.yaml")
    assert value["methods"] == [{"lr": "1e-4", "top_k": 8, "name": "a"}, {"lr": "1e-4", "top_k": 8, "name": "b"}]
    assert node.value[1][0].value == "methods" and node.value[1][0].start_mark.line == 1
    assert parse_yaml("", "empty.yaml") == (None, None)
    assert parse_yaml("[a, 1, null]", "--set x=[a, 1, null]")[0] == ["a", 1, None]
