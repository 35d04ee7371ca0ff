"""IFEval: every instruction type on pass and fail cases, strict vs loose, real prompts, loading, scoring."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import shared_data

from raftune.data import DataError
from raftune.ifeval import (
    INSTRUCTIONS,
    IFEvalPrompt,
    check_instruction,
    check_loose,
    count_sentences,
    count_words,
    detect_language,
    load_ifeval,
    loose_variants,
    score,
    word_tokens,
)

AT_LEAST, LESS_THAN = "at least", "less than"
NTH = "length_constraints:nth_paragraph_first_word"
SECOND = {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "second"}  # paragraph 2 of 3

# (instruction id, kwargs, response, strict verdict). Each type has a passing and a failing case;
# counts sit on the boundary (exactly N with "at least N", N with "less than N").
CASES = [
    # keywords: substrings for existence and frequency (the official's rule), words for forbidden
    ("keywords:existence", {"keywords": ["alpha", "beta"]}, "Alpha came before BETA.", True),
    ("keywords:existence", {"keywords": ["alpha", "beta"]}, "Only alpha here.", False),
    ("keywords:existence", {"keywords": ["alpha", "beta"]}, "alphabet and betamax", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": AT_LEAST}, "A cat. A CAT.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": AT_LEAST}, "One cat.", False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": LESS_THAN}, "One cat.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": LESS_THAN}, "cat, category", False),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "We ROCK.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "A rocky road.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["rock", "roll"]}, "Let it roll", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": AT_LEAST}, "zZz", True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": AT_LEAST}, "zz", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": LESS_THAN}, "zz", True),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": AT_LEAST}, "#a #b",
     True),
    # language (langdetect); text it cannot classify counts as followed, as in the official
    ("language:response_language", {"language": "de"},
     "Das ist ein schöner Tag und wir gehen heute in den Park.", True),
    ("language:response_language", {"language": "de"}, "Hamburgers are sandwiches in my opinion.", False),
    ("language:response_language", {"language": "de"}, "12345 !!!", True),
    # length
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": AT_LEAST}, "One. Two. Three.",
     True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": AT_LEAST}, "One. Two.", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LESS_THAN},
     "Dr. Smith went home. He was tired.", True),  # "Dr." ends no sentence: 2
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": LESS_THAN},
     "Dr. Smith went home. He was tired.", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": AT_LEAST}, "one two three four five",
     True),
    ("length_constraints:number_words", {"num_words": 5, "relation": AT_LEAST}, "one two three four", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": LESS_THAN}, "one two three four", True),
    ("length_constraints:number_words", {"num_words": 3, "relation": LESS_THAN}, "don't stop", False),  # 3
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n* * *\nSecond.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nFirst.\n***\nSecond.\n***", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\n***\nSecond.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A *** B *** C", False),
    (NTH, {**SECOND, "first_word": "Second"}, "One.\n\nSecond, then.\n\nThree.", True),
    (NTH, SECOND, "One.\n\n\"Second\" here.\n\nThree.", True),
    (NTH, SECOND, "One.\n\nThen second.\n\nThree.", False),
    (NTH, SECOND, "One.\n\nSecond.", False),
    # a leading blank paragraph is not counted but still shifts which paragraph is read (official)
    (NTH, SECOND, "\n\nOne.\n\nSecond.\n\nThree.", False),
    # detectable content
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] lives at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] lives at [add\nress].", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\nP.S. See you.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\np. s. see you", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\nPS see you", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Bye.\nP.P.S. More.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Bye.\nP.S. Only one.", False),
    ("detectable_content:postscript", {"postscript_marker": "Note:"}, "Bye.\nnote: later", True),
    # detectable format
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n**bold**\n- b", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "- a\n- b\n- c", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a", False),
    ("detectable_format:constrained_response", {}, "My answer is maybe. It depends.", True),
    ("detectable_format:constrained_response", {}, "Maybe.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and ** **", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one\ntwo*", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nx\nSection 2\ny", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "SECTION 1\nx\nSECTION 2\ny", False),  # case-sensitive
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nonly one", False),
    ("detectable_format:json_format", {}, '{"a": 1}', True),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, 'Here: {"a": 1}', False),
    ("detectable_format:title", {}, "<<Poem of Joy>>\nLa la.", True),
    ("detectable_format:title", {}, "<<  >>\nLa la.", False),
    ("detectable_format:title", {}, "<<Poem\n>>", False),
    # combination
    ("combination:two_responses", {}, "God\n******\nAllah", True),
    ("combination:two_responses", {}, "******\nGod\n******\nAllah\n******", True),
    ("combination:two_responses", {}, "God\n******\nGod", False),
    ("combination:two_responses", {}, "God\n******\n******\nAllah", False),
    ("combination:two_responses", {}, "God", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "  say HI. Hi!", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Hi! Say hi.", False),
    # start and end
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, '"Done. any other questions?"\n', True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Bye.", False),
    ("startend:quotation", {}, '  "hi"\n', True),
    ("startend:quotation", {}, '"', False),
    ("startend:quotation", {}, 'hi "there"', False),
    # case: capital words are NLTK word tokens ("DON'T" is DO + N'T)
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": AT_LEAST},
     "I LOVE NASA", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AT_LEAST},
     "I DON'T", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AT_LEAST},
     "only ONE here", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": LESS_THAN},
     "only ONE here", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 1, "capital_relation": LESS_THAN},
     "only ONE here", False),
    ("change_case:english_capital", {},
     "THE WEATHER IS VERY NICE TODAY AND WE ARE GOING TO THE PARK WITH OUR FRIENDS.", True),
    ("change_case:english_capital", {}, "The weather is nice.", False),
    ("change_case:english_capital", {}, "ICH BIN HEUTE SEHR MÜDE UND GEHE FRÜH SCHLAFEN", False),  # German
    ("change_case:english_lowercase", {}, "this is a quiet sentence written in english.", True),
    ("change_case:english_lowercase", {}, "This is a quiet sentence written in English.", False),
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "One, two.", False),
]


def test_cases_cover_every_instruction():
    assert {case[0] for case in CASES} == set(INSTRUCTIONS)
    assert len(INSTRUCTIONS) == 25


@pytest.mark.parametrize("instruction_id, kwargs, response, expected", CASES,
                         ids=[f"{c[0].split(':')[1]}-{i}" for i, c in enumerate(CASES)])
def test_strict_verdict(instruction_id, kwargs, response, expected):
    assert check_instruction(instruction_id, response, kwargs, "prompt") is expected
    if expected:  # loose tries the response itself first
        assert check_loose(instruction_id, response, kwargs, "prompt")


@pytest.mark.parametrize("instruction_id", sorted(INSTRUCTIONS))
def test_blank_response_follows_nothing(instruction_id):
    kwargs = next(c[1] for c in CASES if c[0] == instruction_id)
    for blank in ("", "  \n\t"):
        assert check_instruction(instruction_id, blank, kwargs, "prompt") is False
        assert check_loose(instruction_id, blank, kwargs, "prompt") is False


# --- counting -------------------------------------------------------------------------------------

def test_sentences_words_and_tokens():
    assert count_sentences("Dr. Smith went home. He was tired. Was he? Yes!") == 4
    assert count_sentences("It costs 3.14 dollars in the U.S. today.") == 1
    assert count_words("don't stop-now, 2 times") == 6  # runs of \w: don, t, stop, now, 2, times
    assert word_tokens("I DON'T KNOW. \"Really\"") == ["I", "DO", "N'T", "KNOW", ".", "``", "Really", "''"]


PUNKT_TEXTS = [
    "Dr. Smith went to Washington D.C. on Jan. 5. He said: \"Hi!\" Then he left.",
    "It costs 3.14 dollars in the U.S. today. Mr. J. R. R. Tolkien wrote it... Did he? Yes!",
    "i.e. the first; e.g. the second. (See p. 5.) 'Quoted.' And then -- nothing.\n\nNew paragraph here.",
    "Prof. Brown, Ph.D., arrived at 3 p.m. on Sept. 12th. The meeting (room 4B) began. St. Louis is far.",
    "SHOUTING IS HERE. NO PERIODS HERE\nJUST LINES\n* bullet one\n* bullet two. Done.",
    "",
]


def test_punkt_tab_folder_gives_nltk_the_same_splits(tmp_path, monkeypatch):
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer, load_punkt_params

    from raftune.ifeval import punkt_tab_nltk_dir, split_sentences

    monkeypatch.setenv("RAFTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download was called"))
    root = punkt_tab_nltk_dir()
    assert root.is_relative_to(tmp_path / "nltk_data") and nltk.data.path[0] == str(root)
    found = nltk.data.find("tokenizers/punkt_tab/english/")
    assert Path(str(found)).is_relative_to(root)

    import punkt

    model, params = punkt.load_model("english"), load_punkt_params(found)  # the tables read back whole
    assert params.abbrev_types == set(model.abbrev_types) and params.sent_starters == set(model.sent_starters)
    assert params.collocations == set(model.collocations) and dict(params.ortho_context) == model.ortho_context

    tokenizer = PunktTokenizer("english")  # what nltk.sent_tokenize builds, read from the folder
    for text in PUNKT_TEXTS:
        assert tokenizer.tokenize(text) == split_sentences(text)
        assert nltk.sent_tokenize(text) == split_sentences(text)
        assert nltk.word_tokenize(text) == word_tokens(text)

    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert punkt_tab_nltk_dir() == root  # written once: a second call reuses the folder
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    assert nltk.data.path.count(str(root)) == 1
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_language_detection_is_repeatable():
    text = "ok fine"  # short text: unseeded langdetect answers differently from run to run
    assert len({detect_language(text) for _ in range(5)}) == 1
    assert detect_language("...") is None


# --- loose ----------------------------------------------------------------------------------------

def test_loose_variants_are_the_official_eight():
    assert loose_variants("a\n*b*\nc") == ["a\n*b*\nc", "*b*\nc", "a\n*b*", "*b*",
                                           "a\nb\nc", "b\nc", "a\nb", "b"]


LOOSE_ONLY = [  # fail strictly, pass loosely
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Sure, here it is:\nSay hi. Hi!"),
    ("startend:quotation", {}, 'Here you go:\n"hello"'),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?\nBye!"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. **Any other questions?**"),
    ("detectable_format:json_format", {}, 'Sure, here it is:\n{"a": 1}\nHope this helps.'),
    ("punctuation:no_comma", {}, "Sure, here it is:\nNo commas below"),
    ("change_case:english_lowercase", {},
     "Sure! Here it is:\nthis is a quiet sentence written in english."),
]


@pytest.mark.parametrize("instruction_id, kwargs, response", LOOSE_ONLY)
def test_loose_passes_where_strict_fails(instruction_id, kwargs, response):
    assert check_instruction(instruction_id, response, kwargs, "prompt") is False
    assert check_loose(instruction_id, response, kwargs, "prompt") is True


def test_loose_still_fails_a_response_that_does_not_follow():
    assert not check_loose("punctuation:no_comma", "Intro\nOne, two\nOutro", {}, "p")  # middle comma
    assert not check_loose("length_constraints:number_words", "Sure:\none two\nBye",
                           {"num_words": 5, "relation": AT_LEAST}, "p")


# --- real prompts -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_prompts() -> dict:
    return {p.key: p for p in load_ifeval(shared_data("ifeval", "input_data.jsonl"))}


REPEAT_1012 = ("Write an email to my boss telling him that I am quitting. The email must contain a title "
               "wrapped in double angular brackets, i.e. <<title>>.")

# (key, response written for the prompt, strict verdicts, loose verdicts), in the order of the
# prompt's instruction_id_list. Every verdict was checked by hand against the official rules (words,
# bullets, highlights, placeholders and capital words counted one by one); where English or another
# language is required, langdetect's answer for the text was checked too.
REAL = [
    # no_comma, >= 3 highlights (exactly 3), >= 300 words (25)
    (1000, "*Early Life* Raymond III was born in 1140.\n\n*Reign* He ruled Tripoli for many years.\n\n"
           "*Death* He died in 1187 after the Battle of Hattin.", [True, True, False], [True, True, False]),
    # >= 12 placeholders: exactly 12
    (1005, "Name: [name]\nAddress: [address]\nPhone: [phone]\nEmail: [email]\n"
           "School: [school] in [city] [state]\nGraduated: [year]\nSkills: [skill 1] [skill 2] [skill 3]\n"
           "Reference: [reference]", [True], [True]),
    # 11 placeholders
    (1005, "Name: [name]\nAddress: [address]\nPhone: [phone]\nEmail: [email]\n"
           "School: [school] in [city] [state]\nGraduated: [year]\nSkills: [skill 1] [skill 2] [skill 3]",
     [False], [False]),
    # repeat the request, title
    (1012, REPEAT_1012 + "\n\n<<Resignation Letter>>\n\nDear Boss: I am leaving in two weeks.",
     [True, True], [True, True]),
    # a first line before the repeat: fails strictly, passes loosely
    (1012, "Sure! Here is the request and my answer:\n" + REPEAT_1012 + "\n\n<<Resignation Letter>>\n\n"
           "Dear Boss: I am leaving.", [False, True], [True, True]),
    # English, all lowercase
    (1019, "what are the two young boys holding in their hands?", [True], [True]),
    (1019, "What are the two boys holding?", [False], [False]),
    # exactly 3 bullets; "**Ava" lines are not bullets
    (102, "**Ava (ball gown):** You look comfortable.\n**Ben (sweats):** Comfort matters tonight.\n\n"
          "Ava's reasons:\n* It is a formal event.\n* Dressing up is fun.\n* First impressions count.",
     [True], [True]),
    # all capitals in English, >= 2 PARAGRAPH sections
    (1021, "PARAGRAPH 1\nTHIS SENTENCE IS TOO SIMPLE. LAWS CHANGE THROUGH DEBATE, NOT DISOBEDIENCE.\n\n"
           "PARAGRAPH 2\nIGNORING LAWS YOU DISLIKE INVITES CHAOS AND WEAKENS TRUST IN INSTITUTIONS.",
     [True, True], [True, True]),
    # capital words (EXPERT, LOGISTICS, SUPPLY, SQL: 4) < 10 and >= 1, wrapped in quotes
    (1040, '"Matthias Algiers\nEXPERT in LOGISTICS and SUPPLY chains.\nSkills: Python and SQL."',
     [True, True, True], [True, True, True]),
    # both keywords, 16 words < 500, no comma
    (1069, "We are experiencing delays that seem correlated with the storm. Please join the meeting on "
           "Monday.", [True, False, True], [True, False, True]),
    # JSON in a fence; JSON after a first line passes loosely only
    (1075, '```json\n{"product": "Comfy Diaper", "tagline": "Soft all night"}\n```', [True], [True]),
    (1075, 'Here is your ad:\n{"product": "Comfy Diaper"}', [False], [True]),
    # 2 paragraphs split by ***; "* * *" is no divider for the official, even loosely
    (1082, "Max woke up to a floating health bar.\n***\nHe found the exit and pressed start.", [True], [True]),
    (1082, "Max woke up to a floating health bar.\n* * *\nHe found the exit and pressed start.",
     [False], [False]),
    # two different responses
    (1098, "God\n******\nAllah", [True], [True]),
    # >= 4 SECTION marks, ends with the phrase (surrounding quotes are ignored)
    (1127, "SECTION 1\nI skipped the lecture.\nSECTION 2\nI skipped the lab.\nSECTION 3\nI skipped the "
           "seminar.\nSECTION 4\nNow I ask:\n\"Can I get my money back for the classes I missed?\"",
     [True, True], [True, True]),
    # capitals in English; "ROCKY" is not the forbidden word "rock"
    (1132, "IGNORE THE STORM; WE ARE ROCKY AND READY TO SING ALL NIGHT LONG WITH OUR FRIENDS",
     [True, True], [True, True]),
    # lowercase English; "story" 3 times as a substring (story, hi-story, story) >= 2
    (1153, "every pilgrim has a story. islamic history is a living story we share together.",
     [True, True], [True, True]),
    # letter o once < 6, 1 sentence < 6, 2 highlights >= 2
    (1174, "Weather for [city]: *sunny* and *warm*.", [True, True, True], [True, True, True]),
    # capitals in English, P.S. present, "sneaker" once < 10
    (1219, "NIKE MAKES THE BETTER SNEAKER FOR MOST PEOPLE.\nP.S. PRADA IS FOR FASHION.",
     [True, True, False], [True, True, False]),
    # 4 paragraphs, the first starting with "Weekend" (after the quote), wrapped in quotes
    (1609, '"Weekend plans make an easy opener.\n\nAsk her about a film she wants to see.\n\n'
           'Keep the question short and friendly.\n\nAccept her answer with grace."',
     [True, True], [True, True]),
    (227, "My answer is no. A golden retriever is usually bigger.", [True], [True]),
    # Kannada; English is not
    (1108, "ಹ್ಯಾಂಬರ್ಗರ್ ಒಂದು ಸ್ಯಾಂಡ್‌ವಿಚ್ ಅಲ್ಲ, ಅದು ತನ್ನದೇ ಆದ ಆಹಾರ.", [True], [True]),
    (1108, "Hamburgers are sandwiches in my opinion.", [False], [False]),
    # lowercase English; '#' exactly 4 times >= 4
    (1122, "new drop tonight, so come and see the show with your friends #style #mood #night #vibes",
     [True, True], [True, True]),
]


@pytest.mark.parametrize("key, response, strict, loose", REAL, ids=[str(r[0]) for r in REAL])
def test_real_prompt_verdicts(real_prompts, key, response, strict, loose):
    p = real_prompts[key]
    result = score([p], [response])["per_prompt"][0]
    assert (result["strict"], result["loose"]) == (strict, loose)
    assert [check_instruction(i, response, kw, p.prompt) for i, kw in zip(p.instruction_ids, p.kwargs)] \
        == strict


def test_real_file_loads(real_prompts):
    prompts = list(real_prompts.values())
    assert len(prompts) == 541
    assert {i for p in prompts for i in p.instruction_ids} == set(INSTRUCTIONS)
    assert sum(len(p.instruction_ids) for p in prompts) == 834
    first = prompts[0]
    assert first.key == 1000 and first.prompt.startswith("Write a 300+ word summary")
    assert first.instruction_ids == ["punctuation:no_comma", "detectable_format:number_highlighted_sections",
                                     "length_constraints:number_words"]
    assert first.kwargs == [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 300}]


# --- scoring ----------------------------------------------------------------------------------------

def test_score_arithmetic():
    prompts = [
        IFEvalPrompt(1, "p1", ["punctuation:no_comma", "startend:quotation"], [{}, {}]),
        IFEvalPrompt(2, "p2", ["punctuation:no_comma"], [{}]),
        IFEvalPrompt(3, "p3", ["punctuation:no_comma", "startend:quotation",
                               "detectable_format:title"], [{}, {}, {}]),
    ]
    responses = [
        '"no commas"',               # both followed
        "a, b",                      # comma: not followed, strictly or loosely
        'Here it is:\n"<<T>> x"',    # no comma, title; quotation only loosely
    ]
    result = score(prompts, responses)
    assert [r["strict"] for r in result["per_prompt"]] == [[True, True], [False], [True, False, True]]
    assert [r["loose"] for r in result["per_prompt"]] == [[True, True], [False], [True, True, True]]
    assert [r["key"] for r in result["per_prompt"]] == [1, 2, 3]
    assert [r["follow_all_strict"] for r in result["per_prompt"]] == [True, False, False]
    assert [r["follow_all_loose"] for r in result["per_prompt"]] == [True, False, True]
    assert result["n_prompts"] == 3
    assert result["prompt_strict"] == pytest.approx(1 / 3)
    assert result["instruction_strict"] == pytest.approx(4 / 6)
    assert result["prompt_loose"] == pytest.approx(2 / 3)
    assert result["instruction_loose"] == pytest.approx(5 / 6)


def test_score_rejects_mismatched_input():
    p = IFEvalPrompt(1, "p", ["punctuation:no_comma"], [{}])
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        score([p], ["a", "b"])
    with pytest.raises(ValueError, match="no prompts"):
        score([], [])
    with pytest.raises(TypeError, match="must be a string"):
        score([p], [None])


def test_check_rejects_unknown_ids_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown IFEval instruction"):
        check_instruction("keywords:rhyme", "x", {}, "p")
    with pytest.raises(ValueError, match="'relation'.*'less than' or 'at least'"):
        check_instruction("length_constraints:number_words", "x", {"num_words": 3, "relation": "at most"}, "p")
    with pytest.raises(ValueError, match="'num_words': missing"):
        check_instruction("length_constraints:number_words", "x", {"relation": "at least"}, "p")
    # null arguments are absent (the Hugging Face copy lists every argument, most of them null)
    assert check_instruction("punctuation:no_comma", "x", {"num_words": None, "keywords": None}, "p")


# --- loading errors ---------------------------------------------------------------------------------

GOOD = {"key": 7, "prompt": "Say hi without commas.", "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}]}


def write_rows(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def test_loads_gzip_blank_lines_and_null_arguments(tmp_path):
    hf_style = {"key": 8, "prompt": "Count.", "instruction_id_list": ["length_constraints:number_words"],
                "kwargs": [{"num_words": 5, "relation": "less than", "keywords": None, "language": None}]}
    path = write_rows(tmp_path / "in.jsonl.gz", [GOOD, "  ", hf_style])
    prompts = load_ifeval(path)
    assert [p.key for p in prompts] == [7, 8]
    assert prompts[1].kwargs == [{"num_words": 5, "relation": "less than"}]


def _bad(**changes) -> dict:
    return {**GOOD, **changes}


@pytest.mark.parametrize("row, field, message", [
    ("{not json", None, "malformed JSON"),
    ([1, 2], None, "expected an object"),
    ({k: v for k, v in GOOD.items() if k != "prompt"}, "prompt", "missing"),
    (_bad(prompt="  "), "prompt", "empty"),
    (_bad(key=True), "key", "expected a number or a string"),
    (_bad(instruction_id_list=[]), "instruction_id_list", "non-empty list"),
    (_bad(instruction_id_list=["punctuation:no_comma", "keywords:rhyme"], kwargs=[{}, {}]),
     "instruction_id_list[1]", "unknown instruction 'keywords:rhyme'"),
    (_bad(kwargs=[{}, {}]), "kwargs", "2 entries for 1 instructions"),
    (_bad(kwargs=[[]]), "kwargs[0]", "expected an object of arguments"),
    (_bad(kwargs=[{"foo": 1}]), "kwargs[0].foo", "not an argument of punctuation:no_comma"),
    (_bad(instruction_id_list=["length_constraints:number_words"], kwargs=[{"relation": "at least"}]),
     "kwargs[0].num_words", "missing"),
    (_bad(instruction_id_list=["length_constraints:number_words"],
          kwargs=[{"num_words": "300", "relation": "at least"}]), "kwargs[0].num_words", "whole number"),
    (_bad(instruction_id_list=["length_constraints:number_words"],
          kwargs=[{"num_words": 3, "relation": "more than"}]), "kwargs[0].relation", "'less than' or"),
    (_bad(instruction_id_list=["keywords:existence"], kwargs=[{"keywords": []}]),
     "kwargs[0].keywords", "non-empty list"),
    (_bad(instruction_id_list=["keywords:letter_frequency"],
          kwargs=[{"letter": "ab", "let_frequency": 2, "let_relation": "at least"}]),
     "kwargs[0].letter", "single character"),
    (_bad(instruction_id_list=["length_constraints:nth_paragraph_first_word"],
          kwargs=[{"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "so"}]),
     "kwargs[0].nth_paragraph", "1 to num_paragraphs"),
])
def test_bad_line_names_file_line_and_field(tmp_path, row, field, message):
    path = write_rows(tmp_path / "in.jsonl", [_bad(key=1), row])
    with pytest.raises(DataError) as info:
        load_ifeval(path)
    e = info.value
    assert (e.path, e.line, e.field) == (str(path), 2, field)
    assert message in e.message
    assert str(e).startswith(f"{path}:2:")


def test_repeated_key_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="repeats the key of line 1") as info:
        load_ifeval(write_rows(tmp_path / "dup.jsonl", [GOOD, GOOD]))
    assert (info.value.line, info.value.field) == (2, "key")
    with pytest.raises(DataError, match="no such file"):
        load_ifeval(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="no prompts"):
        load_ifeval(write_rows(tmp_path / "empty.jsonl", [" "]))
