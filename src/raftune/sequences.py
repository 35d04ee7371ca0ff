"""Token sequences for training: the student's prompts and answers, and the teacher's inputs.

Student: the question in the model's chat format, with the generation prompt; the answer follows
as plain tokens and ends with the end-of-turn token the model itself emits when it stops.

Teacher (paper Appendix H): the plain-text pieces
    "Background reference knowledge:" + reference + "\\nAnswer the question based on the reference
    knowledge:\\n" + question + "\\nAnswer:"
each tokenized WITHOUT special tokens and concatenated as token lists, followed by the student's
trajectory tokens. The ``chat`` variant puts the same reference text into a chat-formatted user
turn instead; the ``none`` variant gives the teacher the student's own prompt (on-policy
distillation with an unconditioned teacher).

The reference is never cut silently: it has an explicit budget of ``max_reference_tokens``; a
longer one is cut to its first tokens and the cut is reported to the caller, which counts it.

Text from data files is text: questions, answers, system prompts and references are tokenized so
that a special-token string inside them (``<|im_end|>``, ``<|im_start|>``...) stays the characters it
is, never the control token. ``chat_ids`` builds every chat-formatted input (only the chat template's
own markup becomes special tokens) and ``text_ids`` every plain-text piece; ``special_token_hits``
counts the rows that held such strings, which each stage records and warns about. Text without them
gets exactly the ids the tokenizer always gave it.

Alignment: for trajectory token t (0-based) of sample i, the logits that predict it sit at position
``start_i + t - 1`` of each model's input, where ``start_i`` is the length of that model's context
(prompt for the student, context for the teacher). ``trajectory_positions`` gives these indices.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

APPENDIX_H = ("Background reference knowledge:", "\nAnswer the question based on the reference knowledge:\n", "\nAnswer:")
TEACHER_CONTEXTS = ("appendix_h", "chat", "none")


def text_ids(tok, text: str, add_special_tokens: bool = False) -> list[int]:
    """``text`` as plain text: a special-token string in it is tokenized as its characters.
    ``add_special_tokens`` adds what the tokenizer adds around a text (a BOS), as for a raw prompt."""
    return tok(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]


@functools.cache
def _check_sanitizes(tok_class: type) -> None:
    if "sanitize_control_tokens" not in inspect.signature(tok_class.apply_chat_template).parameters:
        import transformers

        # an older transformers would hand the flag to the template unread: contents would parse as markup
        raise RuntimeError(f"transformers {transformers.__version__} cannot keep message contents apart from the chat "
                           "template's markup; raftune needs transformers >= 5.20 (pip install -U transformers)")


def chat_ids(tok, messages: list[dict[str, str]], add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> list[int]:
    """``messages`` in the model's chat format, where only the template's own markup can be a special
    (control) token: every message content is tokenized as text. ``continue_final_message`` leaves the
    last (assistant) message open for the model to continue, instead of adding a generation prompt."""
    _check_sanitizes(type(tok))
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt and not continue_final_message,
                                  continue_final_message=continue_final_message, tokenize=True,
                                  sanitize_control_tokens=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def chat_prompt_ids(tok, question: str, system: str | None = None) -> list[int]:
    """The student's prompt: ``question`` (after ``system``) in a user turn, and the generation prompt."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return chat_ids(tok, msgs)


# A server's tokenizer is not known here: the spellings of the common chat formats' control tokens
# (ChatML and Llama 3 <|...|>, Llama 2 and Mistral <s> [INST], Gemma <start_of_turn>)
SERVER_SPECIAL = re.compile(r"<\|[A-Za-z0-9_.:/-]{1,40}\|>|</?s>|\[/?INST\]|<(?:start|end)_of_turn>")


def special_strings(tok) -> list[str]:
    """The strings ``tok`` reads as special tokens (the ones ``text_ids`` and ``chat_ids`` keep as text)."""
    return sorted({t.content for t in tok.added_tokens_decoder.values() if t.special}, key=len, reverse=True)


def special_token_hits(tok, rows: Iterable[str | Sequence[str | None]]) -> int:
    """How many ``rows`` (a text, or a row's texts: question, answer, ...) hold a special-token string of
    ``tok``; ``tok=None`` (a server's model) looks for the common chat formats' ones (``SERVER_SPECIAL``)."""
    found = SERVER_SPECIAL.search if tok is None else re.compile("|".join(map(re.escape, special_strings(tok))) or "(?!)").search
    return sum(any(t and found(t) for t in ([row] if isinstance(row, str) else row)) for row in rows)


def warn_special_text(logger, stage: str, n: int, n_rows: int, server: bool = False) -> None:
    """The one warning line of a stage whose data held special-token strings."""
    if not n:
        return
    if server:
        logger.warning("%s: %d of %d rows hold strings spelled like chat control tokens (e.g. <|im_end|>); they are sent "
                       "to the server as text, and a server that parses control tokens in message contents reads them as "
                       "markup", stage, n, n_rows)
    else:
        logger.warning("%s: %d of %d rows hold special-token strings (e.g. <|im_end|>); they are tokenized as plain "
                       "text, never as control tokens", stage, n, n_rows)


def end_of_turn_id(tok, model_config=None) -> int:
    """The token that ends the model's reply: generation config's EOS if given, else the tokenizer's."""
    eos = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(eos, list):
        eos = eos[0]
    return eos if eos is not None else tok.eos_token_id


@dataclass(frozen=True)
class TeacherContext:
    ids: list[int]
    reference_truncated: bool


def teacher_context_ids(tok, mode: str, question: str, reference: str | None, student_prompt: list[int],
                        max_reference_tokens: int, system: str | None = None) -> TeacherContext:
    """The teacher's input before the trajectory, in one of ``TEACHER_CONTEXTS``."""
    if mode == "none":
        return TeacherContext(list(student_prompt), False)
    if reference is None:
        raise ValueError(f"teacher context {mode!r} needs a reference answer")
    ref = text_ids(tok, reference)
    truncated = len(ref) > max_reference_tokens
    ref = ref[:max_reference_tokens]
    if mode == "appendix_h":
        pre, mid, suf = APPENDIX_H
        return TeacherContext(text_ids(tok, pre) + ref + text_ids(tok, mid) + text_ids(tok, question) + text_ids(tok, suf), truncated)
    if mode == "chat":
        pre, mid, _ = APPENDIX_H
        content = pre + tok.decode(ref) + mid + question
        return TeacherContext(chat_prompt_ids(tok, content, system), truncated)
    raise ValueError(f"unknown teacher context {mode!r}; use one of {TEACHER_CONTEXTS}")


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BT, attention_mask_BT) with every sequence left-aligned."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_BT, attention_mask_BT, position_ids_BT) with every sequence right-aligned (its last token at
    T - 1, as batched decoding and last-position scoring want); positions count real tokens only, pads
    get position 0 (as transformers' generate gives them)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


def answer_batch(tok, prompts: list[list[int]], answers: list[str], eot_id: int, max_len: int, pad_id: int):
    """Prompt + answer + end-of-turn, right-padded, for cross-entropy on the answer tokens.

    Returns (ids_BT, attention_mask_BT, labels_BT, label_mask_BT, n_truncated): ``labels[:, t]`` is
    the token predicted by the logits at position t (already shifted); ``label_mask`` marks answer
    tokens. Sequences longer than ``max_len`` lose answer tokens from the end (counted).
    """
    seqs, starts, truncated = [], [], 0
    for p, a in zip(prompts, answers):
        s = p + text_ids(tok, a) + [eot_id]
        if len(s) > max_len:
            s, truncated = s[:max_len], truncated + 1
        if len(s) <= len(p):
            raise ValueError(f"max_len={max_len} leaves no answer token after a prompt of {len(p)} tokens")
        seqs.append(s)
        starts.append(len(p))
    ids, attn = pad_right(seqs, pad_id)
    labels = torch.full_like(ids, 0)
    labels[:, :-1] = ids[:, 1:]
    label_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        label_mask[i, start - 1 : len(s) - 1] = True  # position t predicts token t+1: answer tokens start at `start`
    return ids, attn, labels, label_mask, truncated


def trajectory_batch(contexts: list[list[int]], traj_BL: torch.Tensor, traj_mask_BL: torch.Tensor, pad_id: int):
    """Context + trajectory per sample, right-padded, and where the logits for each trajectory token sit.

    Returns (ids_BT, attention_mask_BT, pos_BL): ``pos[i, t]`` is the position whose logits predict
    ``traj[i, t]`` (context length + t - 1). Masked trajectory tokens (after EOS) are not fed.
    """
    seqs = []
    for ctx, row, m in zip(contexts, traj_BL.tolist(), traj_mask_BL.tolist()):
        seqs.append(ctx + [t for t, keep in zip(row, m) if keep])
    ids, attn = pad_right(seqs, pad_id)
    L = traj_BL.shape[1]
    starts = torch.tensor([len(c) for c in contexts]).unsqueeze(1)  # (B, 1)
    pos = starts - 1 + torch.arange(L).unsqueeze(0)  # (B, L)
    pos = torch.minimum(pos, torch.full_like(pos, ids.shape[1] - 1))  # masked tail: any valid index
    return ids, attn, pos
