"""Token layouts of stage 2, above all the alignment of teacher and student on the trajectory."""
import pytest
import torch

from raftune.rollout import mask_after_eos
from raftune.sequences import (
    APPENDIX_H,
    answer_batch,
    chat_prompt_ids,
    teacher_context_ids,
    trajectory_batch,
)


@pytest.fixture(scope="module")
def tok():
    from raftune.models import load_tokenizer

    return load_tokenizer("default")


def test_appendix_h_pieces_are_tokenized_separately_without_special_tokens(tok):
    ctx = teacher_context_ids(tok, "appendix_h", "What is X?", "X is a letter.", [1, 2], 100)
    plain = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = plain(APPENDIX_H[0]) + plain("X is a letter.") + plain(APPENDIX_H[1]) + plain("What is X?") + plain(APPENDIX_H[2])
    assert ctx.ids == expected and not ctx.reference_truncated
    assert tok.bos_token_id not in ctx.ids or tok.bos_token_id in plain("X")
    assert tok.decode(ctx.ids) == "Background reference knowledge:X is a letter.\nAnswer the question based on the reference knowledge:\nWhat is X?\nAnswer:"


def test_reference_budget_is_explicit_and_reported(tok):
    long_ref = "word " * 300
    ctx = teacher_context_ids(tok, "appendix_h", "Q?", long_ref, [], 50)
    assert ctx.reference_truncated
    full = teacher_context_ids(tok, "appendix_h", "Q?", long_ref, [], 1000)
    assert not full.reference_truncated and len(full.ids) - len(ctx.ids) == len(tok(long_ref, add_special_tokens=False)["input_ids"]) - 50


def test_chat_and_none_contexts(tok):
    prompt = chat_prompt_ids(tok, "Q?")
    assert teacher_context_ids(tok, "none", "Q?", None, prompt, 10).ids == prompt
    chat = teacher_context_ids(tok, "chat", "Q?", "Ref.", prompt, 10)
    text = tok.decode(chat.ids)
    assert "Background reference knowledge:Ref." in text and text.rstrip().endswith("assistant")
    with pytest.raises(ValueError, match="unknown teacher context"):
        teacher_context_ids(tok, "other", "Q?", "R", prompt, 10)


def test_teacher_and_student_positions_predict_the_same_trajectory_token(tok):
    """For every kept token t: input[pos[t] + 1] == traj[t] in the student's and the teacher's input."""
    questions, refs = ["Short?", "A longer question with more words?"], ["R1.", "A much longer reference answer here."]
    prompts = [chat_prompt_ids(tok, q) for q in questions]
    contexts = [teacher_context_ids(tok, "appendix_h", q, r, p, 100).ids for q, r, p in zip(questions, refs, prompts)]
    traj = torch.tensor([[10, 11, 12, 13, 14], [20, 21, tok.eos_token_id, 5, 5]])
    tmask = mask_after_eos(traj, {tok.eos_token_id})
    assert tmask.tolist() == [[True] * 5, [True, True, True, False, False]]
    for ctxs in (prompts, contexts):
        ids, attn, pos = trajectory_batch(ctxs, traj, tmask, tok.pad_token_id)
        for i in range(2):
            for t in range(5):
                if tmask[i, t]:
                    assert ids[i, pos[i, t] + 1] == traj[i, t]
                    assert attn[i, pos[i, t] + 1] == 1
            assert int(attn[i].sum()) == len(ctxs[i]) + int(tmask[i].sum())
    # the two inputs differ in context length, so the positions differ, the predicted tokens do not
    assert not torch.equal(trajectory_batch(prompts, traj, tmask, 0)[2], trajectory_batch(contexts, traj, tmask, 0)[2])


def test_answer_labels_cover_the_answer_and_end_of_turn(tok):
    prompts = [chat_prompt_ids(tok, "Q?"), chat_prompt_ids(tok, "Another, longer question?")]
    ids, attn, labels, lmask, cut = answer_batch(tok, prompts, ["Yes.", "No, it is not."], tok.eos_token_id, 1000, tok.pad_token_id)
    assert cut == 0
    for i, (p, a) in enumerate(zip(prompts, ["Yes.", "No, it is not."])):
        predicted = labels[i][lmask[i]].tolist()
        assert predicted == tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids[i, : len(p)].tolist() == p
    _, _, _, lmask2, cut2 = answer_batch(tok, prompts[:1], ["word " * 50], tok.eos_token_id, len(prompts[0]) + 5, 0)
    assert cut2 == 1 and int(lmask2.sum()) == 5

