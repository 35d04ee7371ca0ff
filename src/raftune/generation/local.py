"""The local backend: a transformers model in this process, decoding through the ``DecodeEngine``."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from raftune.generation.base import Completion, Messages, SamplingParams
from raftune.generation.engine import engine_for
from raftune.models import context_length
from raftune.sequences import chat_ids

log = logging.getLogger("raftune.generation.local")


class LocalGenerator:
    """A causal LM in this process; ``chat`` runs the conversations in batches of ``batch_size``.

    Every batch is padded to ``batch_size`` rows when the engine compiles, so a short last batch
    reuses the graph of the full ones. ``compile`` is the engine's (``auto``: CUDA graphs on CUDA).
    """

    def __init__(self, model, tokenizer, name: str, batch_size: int = 16, compile: str = "auto"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
        self.truncated_prompts = 0  # the length guard's count (see _fit)
        self.engine = engine_for(model, pad_id=tokenizer.pad_token_id, eos_ids=self.eos_ids, compile=compile)

    def _fit(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The length guard: a prompt that leaves no room for ``max_new_tokens`` within the model's context
        keeps its last tokens (the chat template's end, where the reply starts); counted in
        ``truncated_prompts`` and logged."""
        context = context_length(self.model)
        if not context:
            return prompts
        room = max(1, context - max_new_tokens)
        cut = [p[-room:] if len(p) > room else p for p in prompts]
        if n := sum(len(p) > room for p in prompts):
            self.truncated_prompts += n
            log.warning("%s: %d prompt(s) longer than its context (%d tokens) minus %d new tokens were cut to their last "
                        "%d tokens", self.name, n, context, max_new_tokens, room)
        return cut

    def chat(self, conversations: Sequence[Messages], params: SamplingParams) -> list[Completion]:
        out: list[Completion] = []
        for start in range(0, len(conversations), self.batch_size):
            out.extend(self._chat_batch(conversations[start : start + self.batch_size], params, start))
        return out

    def _chat_batch(self, conversations: Sequence[Messages], params: SamplingParams, offset: int) -> list[Completion]:
        tok = self.tokenizer
        prefixes = [c[-1]["content"] if c[-1]["role"] == "assistant" else None for c in conversations]
        cont = prefixes[0] is not None  # a reply prefix: continue the assistant turn instead of opening one
        if any((p is not None) != cont for p in prefixes):
            raise ValueError("either every conversation of a call ends with an assistant reply prefix or none does")
        prompts = [chat_ids(tok, list(c), continue_final_message=cont) for c in conversations]
        prompts = self._fit(prompts, params.max_new_tokens)
        if params.seed is not None:
            torch.manual_seed(params.seed + offset)  # each batch of a call draws its own, reproducible stream
        gen = self.engine.generate(prompts, params.max_new_tokens, params.temperature, params.top_p,
                                   batch_bucket=self.batch_size)
        results = []
        for row, n, stopped, prompt, prefix in zip(gen.tokens_BN.tolist(), gen.lengths_B.tolist(), gen.stopped_B.tolist(),
                                                   prompts, prefixes):
            text = tok.decode(row[:n], skip_special_tokens=True)
            text = (prefix + text if prefix else text).strip()
            results.append(Completion(text, len(prompt), n, "stop" if stopped else "length"))
        return results
