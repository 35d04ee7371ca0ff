"""The one interface every generation backend implements, local or remote: chat conversations in,
``Completion``s out, with the same ``SamplingParams``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

Messages = list[dict[str, str]]  # one chat: [{"role": "user", "content": "..."}, ...]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"; "error" when a remote call failed after its retries
    error: str | None = None
    cut: bool = False  # a server's reply far beyond max_new_tokens, cut to what the limit allows (remote.py)


class GenerationFailed(RuntimeError):
    """Generations failed after their retries (a server answering 5xx, or 200 with no chat completion):
    the stage recorded the samples that did not need them, none of those that did, and finished what
    it could. ``run_dir`` is the run folder; ``failed`` says which samples and why. Running the same
    command again asks exactly the failed generations again."""

    def __init__(self, message: str, run_dir, failed):
        super().__init__(message)
        self.run_dir = run_dir
        self.failed = failed


class Generator(Protocol):
    name: str

    def chat(self, conversations: Sequence[Messages], params: SamplingParams) -> list[Completion]:
        """One completion per conversation, in order."""
        ...
