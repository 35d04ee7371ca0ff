import pytest

from raftune.templates import (
    DEFAULT_TEMPLATES,
    LEAK_PHRASES,
    TemplateError,
    dump_templates,
    leaks_prompt,
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
    # str.format would convert, pad, read attributes, index or take positions: plain {name} only
    ("rewrite:\n  user: '{question!r} {answer}'\n", "template 'rewrite': placeholder {question!r} has a conversion !r"),
    ("rewrite:\n  user: '{question} {answer:>999999999}'\n", "placeholder {answer:>999999999} has a format spec :>999999999"),
    ("judge:\n  system: '{question:{answer}}'\n  user: '{question}{answer}{candidate}'\n",
     "template 'judge': placeholder {question:{answer}} has a format spec"),
    ("rewrite:\n  user: '{question.__class__} {answer}'\n", "placeholder {question.__class__} is not a plain name"),
    ("rewrite:\n  user: '{question[0]} {answer}'\n", "placeholder {question[0]} is not a plain name"),
    ("rewrite:\n  user: '{0} {question} {answer}'\n", "placeholder {0} is a position, not a name"),
    ("rewrite:\n  user: '{} {question} {answer}'\n", "placeholder {} is a position, not a name"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
                                                       for p, c in zip("abcdefgh", "bcdefghi")),
     "over 20000 values (aliases expanded)"),
])
def test_bad_template_files_name_the_file_and_problem(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(TemplateError) as e:
        load_templates(path)
    assert message in str(e.value) and "bad.yaml" in str(e.value)


def test_literal_braces_stay_literal(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("rewrite:\n  user: '{{json}}: {question} / {answer}'\n")
    assert load_templates(path)["rewrite"].render(question="q", answer="a")[-1]["content"] == "{json}: q / a"


def test_a_folder_is_not_a_template_file(tmp_path):
    with pytest.raises(TemplateError, match=r"is a folder, not a template file"):
        load_templates(tmp_path)


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


def test_sdft_template_is_editable_and_needs_question_and_answer(tmp_path):
    msgs = DEFAULT_TEMPLATES["sdft"].render(question="Q?", answer="A.")
    assert "Using the reference answer as a guide, write your own response" in msgs[-1]["content"]
    path = tmp_path / "t.yaml"
    path.write_text("sdft:\n  user: 'Guided by {answer}, answer: {question}'\n")
    assert load_templates(path)["sdft"].render(question="q", answer="a")[-1]["content"] == "Guided by a, answer: q"
    path.write_text("sdft:\n  user: 'only {question}'\n")
    with pytest.raises(TemplateError, match=r"template 'sdft' lacks placeholder\(s\) \['answer'\]"):
        load_templates(path)


@pytest.mark.parametrize("phrase", LEAK_PHRASES)
def test_leaks_prompt_finds_each_phrase_in_any_case(phrase):
    for variant in (phrase, phrase.upper(), phrase.title(), phrase.capitalize()):
        assert leaks_prompt(f"Sure. {variant}: the function returns a list.") == phrase


@pytest.mark.parametrize("text, phrase", [
    ("Reference answer:\nIt returns the median.", "reference answer"),
    ("It returns the median, as the reference says.", "the reference"),
    ("Now it\u2019s your turn! It returns the median.", "now it's your turn"),  # typographic apostrophe
    ("### Instruction:\nWhat does median do?\n### Response:\nIt returns the median.", "### instruction"),
    ("Here is your response: it returns the median.", "your response"),
])
def test_leaks_prompt_on_leaking_rewrites(text, phrase):
    assert leaks_prompt(text) == phrase


@pytest.mark.parametrize("text", [
    "statistics.median returns the middle value of the data.",
    "If it cannot be created, we try to make a copy of the referenced file instead.",  # a word, not the phrase
    "Responses are cached; references are weak.",
])
def test_leaks_prompt_passes_clean_text(text):
    assert leaks_prompt(text) is None


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_leaks_prompt_flags_an_empty_rewrite(text):
    assert leaks_prompt(text) == "(empty)"


def test_the_default_sdft_prompt_itself_counts_as_a_leak():
    """A rewrite that parrots the prompt is caught by the phrases of that prompt."""
    prompt = DEFAULT_TEMPLATES["sdft"].render(question="What does median do?", answer="The middle value.")
    assert leaks_prompt(prompt[-1]["content"]) is not None
