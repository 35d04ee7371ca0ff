"""Judges: models that score a candidate answer against a reference, and the parser of their replies.

A judge reply is free text. ``parse_score`` reads a score from it or returns None; it never guesses.
``score_with_judges`` asks every judge, retries the replies that could not be read (sampling, so a
retry can differ), and records what stays unreadable as such: a None score, never a silent default.
A judge call that failed (``Completion.error``: a server that kept answering 5xx or garbage) is no
reply at all: its verdict carries the ``error`` and the caller treats the sample as failed, not as
unreadable nor as a low score.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from raftune.generation import Generator, Messages, SamplingParams

_NUM = r"(\d+(?:\.\d+)?)"
# Most explicit forms first: the first that matches decides.
_PATTERNS = [
    re.compile(r"\[\[\s*" + _NUM + r"\s*\]\]"),  # [[7]] (MT-Bench style)
    re.compile(r"\b(?:score|rating|grade)\b\s*(?:is|of|=|:)?\s*[*_`\"']*\s*" + _NUM + r"(?!\d)", re.I),
    re.compile(_NUM + r"\s*(?:/|out of)\s*10\b", re.I),
]
_ANY_NUMBER = re.compile(r"(?<![\w.])" + _NUM + r"(?!\w|/\d|\.\d)")


def parse_score(text: str, lo: float = 1, hi: float = 10) -> float | None:
    """The score in a judge's reply, or None when the reply holds no unambiguous score in [lo, hi].

    Explicit forms ("Score: 8", "[[8]]", "8/10", "8 out of 10", "**Rating:** 8") win; otherwise a
    reply whose only number is a whole number in range counts ("8", "I'd say 8."). Several bare
    numbers, a bare decimal ("Python 3.11"), or a number out of range give None.
    """
    if not text:
        return None
    for pat in _PATTERNS:
        m = pat.search(text)
        if m:
            value = float(m.group(1))
            return value if lo <= value <= hi else None
    numbers = _ANY_NUMBER.findall(text)
    if len(numbers) == 1 and "." not in numbers[0]:
        value = float(numbers[0])
        return value if lo <= value <= hi else None
    return None


@dataclass(frozen=True)
class Verdict:
    judge: str
    score: float | None  # None: unreadable after all retries, or the call failed (then ``error`` says why)
    reply: str  # the last reply seen
    attempts: int
    completion_tokens: int  # over all attempts
    error: str | None = None  # the judge call failed after the backend's retries: no verdict at all


def score_with_judges(
    judges: Sequence[Generator],
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int,
    retries: int,
    seed: int,
    retry_temperature: float = 0.7,
    parse: Callable[[str], float | None] = parse_score,
) -> list[list[Verdict]]:
    """verdicts[i][j]: judge j on prompt i. First attempt greedy, retries sampled, all batched.

    ``parse`` reads a reply into a score, None when unreadable (then the prompt is asked again). A
    failed call is not asked again here (the backend has retried it): its verdict holds the error.
    """
    verdicts: list[list[Verdict]] = [[None] * len(judges) for _ in prompts]  # type: ignore[list-item]
    for j, judge in enumerate(judges):
        pending = list(range(len(prompts)))
        spent = [0] * len(prompts)
        for attempt in range(1, retries + 2):
            temperature = 0.0 if attempt == 1 else retry_temperature
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 7919 * attempt)
            replies = judge.chat([prompts[i] for i in pending], params)
            still = []
            for i, reply in zip(pending, replies):
                spent[i] += reply.completion_tokens
                if reply.error is not None:
                    verdicts[i][j] = Verdict(judge.name, None, reply.text, attempt, spent[i], error=reply.error)
                    continue
                score = parse(reply.text)
                verdicts[i][j] = Verdict(judge.name, score, reply.text, attempt, spent[i])
                if score is None:
                    still.append(i)
            pending = still
            if not pending:
                break
    return verdicts


def judge_errors(verdicts: Sequence[Verdict]) -> list[str]:
    """The errors of the judge calls that failed, with the judge's name; empty when every judge replied."""
    return [f"judge {v.judge}: {v.error}" for v in verdicts if v.error is not None]


def mean_score(verdicts: Sequence[Verdict]) -> float | None:
    """Average over the judges that gave a readable score; None if none did."""
    scores = [v.score for v in verdicts if v.score is not None]
    return sum(scores) / len(scores) if scores else None
