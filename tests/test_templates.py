import pytest

from raftune.templates import (
    DEFAULT_TEMPLATES,
    TemplateError,
    dump_templates,
    load_templates,
)


def test_defaults_render_values_verbatim():
    msgs = DEFAULT_TEMPLATES["judge"].render(question="Q {x}?", answer="A}", candidate="C{")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert "Q {x}?" in msgs[1]["content"] and "A}" in msgs[1]["content"] and "C{" in msgs[1]["content"]


def test_dump_and_load_roundtrip(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(dump_templates(DEFAULT_TEMPLATES))
    assert load_templates(path) == DEFAULT_TEMPLATES


def test_override_one_template(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("rewrite:\n  user: 'Say it again: {question} / {answer}'\n")
    t = load_templates(path)
    assert t["rewrite"].render(question="q", answer="a") == [{"role": "user", "content": "Say it again: q / a"}]
    assert t["fuse"] == DEFAULT_TEMPLATES["fuse"]


@pytest.mark.parametrize("body, message", [
    ("rewrite:\n  user: 'only {question}'\n", "lacks placeholder(s) ['answer']"),
    ("rewrite:\n  user: '{question} {answer} {nope}'\n", "unknown placeholder(s) ['nope']"),
    ("rewrite:\n  user: '{question} {answer} {'\n", "write literal braces"),
    ("summarise:\n  user: '{question}'\n", "unknown template 'summarise'"),
    ("judge:\n  system: 3\n  user: '{question}{answer}{candidate}'\n", "field 'system' must be a string"),
    ("judge: just text\n", "field 'user' must be a string"),
    ("- a\n- b\n", "expected a mapping"),
    ("rewrite: [unclosed\n", "not valid YAML"),
])
def test_bad_template_files_name_the_file_and_problem(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(TemplateError) as e:
        load_templates(path)
    assert message in str(e.value) and "bad.yaml" in str(e.value)


def test_missing_template_file():
    with pytest.raises(TemplateError, match="no such template file"):
        load_templates("/nonexistent/t.yaml")


def test_reply_prefix_opens_the_assistant_turn(tmp_path):
    msgs = DEFAULT_TEMPLATES["judge"].render(question="q", answer="a", candidate="c")
    assert msgs[-1] == {"role": "assistant", "content": "Score:"}
    path = tmp_path / "t.yaml"
    path.write_text("judge:\n  user: '{question}{answer}{candidate}'\n  reply_prefix: 'Rating:'\n  colour: red\n")
    with pytest.raises(TemplateError, match=r"unknown field\(s\) \['colour'\]"):
        load_templates(path)
