"""Prompt templates as data: named, editable, validated.

Stage 1 uses ``rewrite``, ``fuse`` and ``judge`` (``sdft`` in its SDFT mode); evaluation uses
``domain_judge`` (D-Acc), ``general_judge`` (1-10 scores) and ``pairwise_judge`` (tuned vs base). The paper's prompts are not
in its text; the ones below are ours. Print
them with ``raftune templates``, edit the YAML it writes, and pass it back with ``--templates``:
a file may override any subset of the names. A template has a ``user`` message, an optional ``system`` message and an optional
``reply_prefix`` that opens the model's reply. Placeholders use ``str.format`` syntax; literal braces
in a template are written ``{{`` and ``}}``. Values (questions, answers) are never parsed as templates.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

Messages = list[dict[str, str]]


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    user: str
    system: str | None = None
    # Opens the model's reply (local backends continue it; remote ones drop it). A small judge
    # that is made to start with "Score:" answers with a number far more often.
    reply_prefix: str | None = None

    def fields(self) -> set[str]:
        """The placeholders of ``system`` and ``user``; a ``TemplateError`` for any that is not a plain
        ``{name}``: ``render`` runs ``str.format``, which would otherwise read attributes
        (``{question.__class__}``), index (``{question[0]}``), take positions (``{0}``, ``{}``), convert
        (``{question!r}``) or pad by a size the template gives (``{answer:>999999999}``)."""
        found = set()
        for part in (self.system or "", self.user):
            try:
                parsed = list(string.Formatter().parse(part))
            except ValueError as e:  # unbalanced braces
                raise TemplateError(f"template '{self.name}': {e} (write literal braces as {{{{ and }}}})") from None
            for _, field, spec, conversion in parsed:
                if field is None:  # literal text only
                    continue
                shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                if not field.isidentifier():
                    problem = "a position, not a name" if field == "" or field.isdigit() else "not a plain name"
                    raise TemplateError(f"template '{self.name}': placeholder {shown} is {problem}; "
                                        f"placeholders are {{name}} only (write literal braces as {{{{ and }}}})")
                if conversion or spec:
                    raise TemplateError(f"template '{self.name}': placeholder {shown} has a "
                                        f"{'conversion !' + conversion if conversion else 'format spec :' + spec}; "
                                        f"placeholders are {{name}} only (write literal braces as {{{{ and }}}})")
                found.add(field)
        return found

    def render(self, **values: str) -> Messages:
        msgs = []
        if self.system:
            msgs.append({"role": "system", "content": self.system.format(**values)})
        msgs.append({"role": "user", "content": self.user.format(**values)})
        if self.reply_prefix:
            msgs.append({"role": "assistant", "content": self.reply_prefix})
        return msgs

    def as_dict(self) -> dict:
        return {"system": self.system, "user": self.user, "reply_prefix": self.reply_prefix}


# Which placeholders each template must use (the stage fills exactly these).
REQUIRED_FIELDS: dict[str, set[str]] = {
    "rewrite": {"question", "answer"},
    "sdft": {"question", "answer"},
    "fuse": {"question", "answer", "rewrite"},
    "judge": {"question", "answer", "candidate"},
    "domain_judge": {"question", "answer", "candidate"},
    "general_judge": {"question", "answer"},
    "pairwise_judge": {"question", "answer_a", "answer_b"},
}
REFINE_TEMPLATES = ("rewrite", "fuse", "judge")
SDFT_TEMPLATES = ("sdft",)  # stage 1 in SDFT mode
EVAL_TEMPLATES = ("domain_judge", "general_judge", "pairwise_judge")

DEFAULT_TEMPLATES: dict[str, PromptTemplate] = {
    # Self-conditioned rewriting (paper Eq. 1): the model answers in its own words with the
    # reference in view, the SDFT paradigm (Yang et al., ACL 2024).
    "rewrite": PromptTemplate(
        name="rewrite",
        user=(
            "{question}\n\n"
            "Here is a reference answer:\n{answer}\n\n"
            "Now answer the question above in your own words. Keep every fact of the reference "
            "answer and add nothing that contradicts it. Reply with the answer only."
        ),
    ),
    # SDFT's distillation prompt (Yang et al., ACL 2024), in our words: the model answers the question
    # itself, guided by the dataset's answer. Its key instruction is the paper's.
    "sdft": PromptTemplate(
        name="sdft",
        user=(
            "{question}\n\n"
            "Reference answer:\n{answer}\n\n"
            "Using the reference answer as a guide, write your own response to the question above. "
            "Write it as a direct answer: do not mention the reference answer or these instructions."
        ),
    ),
    # Fusion (Appendix C): merge the original answer and the rewrite into one answer.
    "fuse": PromptTemplate(
        name="fuse",
        user=(
            "Question: {question}\n\n"
            "Answer A (reference):\n{answer}\n\n"
            "Answer B:\n{rewrite}\n\n"
            "Write one answer to the question that keeps all the facts of Answer A and the clear "
            "wording of Answer B. Reply with the merged answer only."
        ),
    ),
    # Consistency judge (Appendix D), on a 1-10 scale; parse_score in judging.py reads the reply.
    "judge": PromptTemplate(
        name="judge",
        system="You are a strict grader. You compare a candidate answer with a reference answer.",
        user=(
            "Question: {question}\n\n"
            "Reference answer:\n{answer}\n\n"
            "Candidate answer:\n{candidate}\n\n"
            "How consistent is the candidate with the reference: same facts, nothing wrong, nothing "
            "important missing? Rate it from 1 (contradicts or unrelated) to 10 (fully consistent). "
            "Reply with one line: Score: <number from 1 to 10>"
        ),
        reply_prefix="Score:",
    ),
    # D-Acc judge: a binary verdict against the reference; evaluate.parse_verdict reads the reply.
    "domain_judge": PromptTemplate(
        name="domain_judge",
        system="You are a strict grader. You decide whether a candidate answer is correct, given a reference answer.",
        user=(
            "Question: {question}\n\n"
            "Reference answer:\n{answer}\n\n"
            "Candidate answer:\n{candidate}\n\n"
            "Is the candidate answer correct: does it agree with the reference on what the question asks, "
            "with nothing that contradicts it? Reply with one line: Verdict: correct, or Verdict: incorrect"
        ),
        reply_prefix="Verdict:",
    ),
    # General QA judge (MS-Bench / MT-Bench single-answer style), 1-10; judging.parse_score reads it.
    "general_judge": PromptTemplate(
        name="general_judge",
        system="You are a careful evaluator of the answers of AI assistants.",
        user=(
            "Rate the answer below for helpfulness, correctness and clarity, from 1 (useless or wrong) "
            "to 10 (excellent).\n\n"
            "Question:\n{question}\n\n"
            "Answer:\n{answer}\n\n"
            "Reply with one line: Score: <number from 1 to 10>"
        ),
        reply_prefix="Score:",
    ),
    # Pairwise judge (MT-Bench pairwise style): which of two answers is better; asked in both orders,
    # evaluate.parse_winner reads the reply.
    "pairwise_judge": PromptTemplate(
        name="pairwise_judge",
        system="You are an impartial evaluator of the answers of AI assistants. The order of the answers "
               "must not influence you, nor their length.",
        user=(
            "Question:\n{question}\n\n"
            "Answer A:\n{answer_a}\n\n"
            "Answer B:\n{answer_b}\n\n"
            "Which answer is more helpful, correct and clear? "
            "Reply with one line: Winner: A, Winner: B, or Winner: tie"
        ),
        reply_prefix="Winner:",
    ),
}


# Phrases of SDFT's prompt (ours and the paper's Alpaca-style one) that a rewrite must not echo: a
# reply that names the reference or the prompt's markers talks about the prompt, not the question.
LEAK_PHRASES = ("reference answer", "your response", "now it's your turn", "now it is your turn",
                "the reference", "as a guide", "### instruction", "### response")
# Whole words only: "the referenced file" of a real answer is no leak.
_LEAK_RE = re.compile("|".join(rf"(?<!\w){re.escape(p)}(?!\w)" for p in LEAK_PHRASES), re.IGNORECASE)


def leaks_prompt(text: str) -> str | None:
    """The leak phrase found first in ``text`` (case-insensitive, returned lower-cased), "(empty)" for a
    blank text, else None."""
    if not text.strip():
        return "(empty)"
    m = _LEAK_RE.search(text.replace("\u2019", "'"))  # a typographic apostrophe still spells "it's"
    return m.group(0).lower() if m else None


def validate(tpl: PromptTemplate, origin: str = "built-in") -> PromptTemplate:
    try:
        found = tpl.fields()
    except TemplateError as e:
        raise TemplateError(f"{origin}: {e}") from None
    need = REQUIRED_FIELDS.get(tpl.name)
    if need is None:
        raise TemplateError(f"{origin}: unknown template '{tpl.name}'; known: {', '.join(sorted(REQUIRED_FIELDS))}")
    if missing := need - found:
        raise TemplateError(f"{origin}: template '{tpl.name}' lacks placeholder(s) {sorted(missing)}")
    if extra := found - need:
        raise TemplateError(
            f"{origin}: template '{tpl.name}' uses unknown placeholder(s) {sorted(extra)}; allowed: {sorted(need)}"
        )
    return tpl


def load_templates(path: str | Path | None = None) -> dict[str, PromptTemplate]:
    """The built-in templates, with those named in the YAML file ``path`` replacing them."""
    templates = dict(DEFAULT_TEMPLATES)
    if path is None:
        return templates
    from raftune.settings import YamlError, read_yaml

    path = Path(path)
    try:
        raw = read_yaml(path, "template file")[0]
    except YamlError as e:
        raise TemplateError(str(e)) from None
    if not isinstance(raw, dict):
        raise TemplateError(f"{path}: expected a mapping of template names to {{system, user}}")
    for name, body in raw.items():
        if not isinstance(body, dict) or not isinstance(body.get("user"), str):
            raise TemplateError(f"{path}: template '{name}': field 'user' must be a string")
        for opt in ("system", "reply_prefix"):
            if body.get(opt) is not None and not isinstance(body[opt], str):
                raise TemplateError(f"{path}: template '{name}': field '{opt}' must be a string")
        if unknown := set(body) - {"system", "user", "reply_prefix"}:
            raise TemplateError(f"{path}: template '{name}': unknown field(s) {sorted(unknown)}")
        templates[name] = validate(
            PromptTemplate(name=name, user=body["user"], system=body.get("system"), reply_prefix=body.get("reply_prefix")),
            str(path))
    return templates


def dump_templates(templates: dict[str, PromptTemplate]) -> str:
    return yaml.safe_dump({n: {k: v for k, v in t.as_dict().items() if v is not None} for n, t in templates.items()}, sort_keys=False, allow_unicode=True, width=100)
