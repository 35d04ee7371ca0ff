import pytest

from raftune.generation import Completion
from raftune.judging import judge_errors, mean_score, parse_score, score_with_judges


@pytest.mark.parametrize("reply, expected", [
    ("Score: 8", 8.0),
    ("score:7", 7.0),
    ("**Score:** 9", 9.0),
    ("Rating: [[6]]", 6.0),
    ("[[10]]", 10.0),
    ("I would give it 7/10.", 7.0),
    ("7 out of 10, it misses a detail", 7.0),
    ("Score: 8/10", 8.0),
    ("The score is 4.5", 4.5),
    ("8", 8.0),
    ("  9.\n", 9.0),
    ("Grade = 3", 3.0),
    ("The candidate mentions 2 of the 3 facts. Score: 6", 6.0),
])
def test_parse_score_reads_explicit_and_bare_scores(reply, expected):
    assert parse_score(reply) == expected


@pytest.mark.parametrize("reply", [
    "",
    "The candidate is mostly consistent.",
    "Score: 11",            # out of range is unreadable, not clipped
    "Score: 0",
    "It has 3 facts and 2 errors",  # two bare numbers: ambiguous
    "Score: high",
    "[[eleven]]",
    "15/10",
    "Python 3.11 is fine",
])
def test_parse_score_returns_none_when_unsure(reply):
    assert parse_score(reply) is None


class ScriptedJudge:
    """A judge whose replies are given in advance, one list per call, to test the retry logic."""

    def __init__(self, name, calls):
        self.name, self.calls, self.seen = name, list(calls), []

    def chat(self, conversations, params):
        replies = self.calls.pop(0)
        assert len(replies) == len(conversations)
        self.seen.append((len(conversations), params.temperature))
        return [r if isinstance(r, Completion) else Completion(r, 10, 3, "stop") for r in replies]


def test_unreadable_replies_are_retried_then_recorded_as_none():
    judge = ScriptedJudge("j", [["Score: 9", "hmm", "no idea"], ["Score: 5", "still no"], ["nope"]])
    verdicts = score_with_judges([judge], [[{"role": "user", "content": str(i)}] for i in range(3)],
                                 max_new_tokens=8, retries=2, seed=0)
    assert [v[0].score for v in verdicts] == [9.0, 5.0, None]
    assert [v[0].attempts for v in verdicts] == [1, 2, 3]
    assert [v[0].completion_tokens for v in verdicts] == [3, 6, 9]  # every attempt's tokens count
    assert verdicts[2][0].reply == "nope"
    # first attempt greedy, retries sampled and only for the unreadable ones
    assert judge.seen == [(3, 0.0), (2, 0.7), (1, 0.7)]


def test_mean_score_ignores_unreadable_judges():
    j1 = ScriptedJudge("a", [["Score: 8", "x"], ["y"]])
    j2 = ScriptedJudge("b", [["Score: 6", "Score: 2"]])
    verdicts = score_with_judges([j1, j2], [[], []], max_new_tokens=8, retries=1, seed=0)
    assert mean_score(verdicts[0]) == 7.0
    assert mean_score(verdicts[1]) == 2.0  # judge a never readable: only b counts
    assert mean_score([verdicts[1][0]]) is None


def test_a_failed_judge_call_is_an_error_not_an_unreadable_reply():
    """A call that failed after the backend's retries is not asked again as if unreadable, and its
    verdict carries the error; an unreadable reply next to it is retried and stays unreadable."""
    failed = Completion("", 0, 0, "error", "POST http://judge/v1/chat/completions answered HTTP 503: overloaded")
    judge = ScriptedJudge("j", [["Score: 9", failed, "hmm"], ["still hmm"]])
    verdicts = score_with_judges([judge], [[{"role": "user", "content": str(i)}] for i in range(3)],
                                 max_new_tokens=8, retries=1, seed=0)
    ok, error, unreadable = (v[0] for v in verdicts)
    assert (ok.score, ok.error) == (9.0, None)
    assert (error.score, error.attempts, error.reply) == (None, 1, "") and "HTTP 503" in error.error
    assert (unreadable.score, unreadable.error, unreadable.attempts) == (None, None, 2)
    assert judge.seen == [(3, 0.0), (1, 0.7)]  # only the unreadable reply is asked again
    assert judge_errors(verdicts[1]) == [f"judge j: {failed.error}"] and judge_errors(verdicts[2]) == []
