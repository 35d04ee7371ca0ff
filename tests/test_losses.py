"""raftune.losses against naive references, at their limits, with pinned values; fp64 where it helps."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from raftune.losses import (
    BudgetController,
    EMABalancer,
    anchor_kl,
    chunked_anchor_kl,
    chunked_log_probs,
    chunked_teacher_topk,
    chunked_token_ce,
    chunked_topk_kl,
    full_kl,
    reduce_step,
    teacher_topk,
    token_ce,
    topk_kl,
)

DIRECTIONS = ["forward", "reverse"]


def randn(*shape, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def ragged_mask(B, T, seed=0):
    """(B, T) bool: row b valid on its first n_b positions, n_b in [1, T], and row 0 fully masked."""
    g = torch.Generator().manual_seed(seed)
    n_B = torch.randint(1, T + 1, (B,), generator=g)
    n_B[0] = 0
    return torch.arange(T)[None, :] < n_B[:, None]


# --- naive references -----------------------------------------------------------------------------

def naive_kl_div(student_BTV, teacher_BTV, temperature, direction):
    """Full-vocabulary KL from F.kl_div, times T^2, per token."""
    logq = F.log_softmax(student_BTV / temperature, -1)
    logp = F.log_softmax(teacher_BTV / temperature, -1)
    if direction == "forward":  # F.kl_div(input=log q, target=log p) = sum p (log p - log q)
        kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    else:
        kl = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)
    return kl * temperature**2


def naive_topk_kl_loop(student_BTV, teacher_BTV, mask_BT, k, temperature, direction):
    """One position at a time: sort the teacher, keep its top k, renormalize both, sum the KL terms."""
    B, T, V = student_BTV.shape
    out = torch.zeros(B, T, dtype=student_BTV.dtype)
    for b in range(B):
        for t in range(T):
            if not mask_BT[b, t]:
                continue
            top = torch.sort(teacher_BTV[b, t], descending=True).indices[: min(k, V)]
            p = torch.softmax(teacher_BTV[b, t, top] / temperature, 0)
            q = torch.softmax(student_BTV[b, t, top] / temperature, 0)
            if direction == "reverse":
                p, q = q, p
            out[b, t] = sum(p[i] * math.log(p[i] / q[i]) for i in range(len(top))) * temperature**2
    return out


def linear_head(W_VD):
    return lambda h_BTD: F.linear(h_BTD, W_VD)


# --- token_ce -------------------------------------------------------------------------------------

def test_token_ce_equals_masked_cross_entropy():
    B, T, V = 3, 5, 11
    logits, mask = randn(B, T, V), ragged_mask(B, T)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    labels_padded = labels.masked_fill(~mask, -1)  # not ignore_index: padding ids must never be indexed
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, T) * mask
    torch.testing.assert_close(token_ce(logits, labels_padded, mask), expected)


# --- teacher_topk ---------------------------------------------------------------------------------

def test_teacher_topk_picks_the_largest_and_renormalizes():
    logits = randn(2, 3, 9)
    logp, idx = teacher_topk(logits, k=4, temperature=2.0)
    assert logp.shape == idx.shape == (2, 3, 4) and idx.dtype == torch.int64
    torch.testing.assert_close(idx, torch.sort(logits, -1, descending=True).indices[..., :4])
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 3, dtype=logp.dtype))
    torch.testing.assert_close(logp, torch.log_softmax(logits.gather(-1, idx) / 2.0, -1))


def test_teacher_topk_clamps_k_to_vocabulary():
    logp, idx = teacher_topk(randn(2, 3, 5), k=512, temperature=1.0)
    assert logp.shape == (2, 3, 5)
    assert (idx.sort(-1).values == torch.arange(5)).all()


# --- KL: references and limits --------------------------------------------------------------------

@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_full_kl_equals_f_kl_div(direction, temperature):
    s, t, mask = randn(3, 4, 13, seed=1), randn(3, 4, 13, seed=2), ragged_mask(3, 4)
    expected = naive_kl_div(s, t, temperature, direction) * mask
    torch.testing.assert_close(full_kl(s, t, mask, temperature, direction), expected)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_topk_kl_with_k_equal_vocabulary_is_full_kl(direction, temperature):
    s, t, mask = randn(3, 4, 13, seed=1), randn(3, 4, 13, seed=2), ragged_mask(3, 4)
    for k in (13, 100):  # K = V, and K > V clamped to V
        logp, idx = teacher_topk(t, k, temperature)
        torch.testing.assert_close(topk_kl(s, logp, idx, mask, temperature, direction),
                                   full_kl(s, t, mask, temperature, direction))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("k,temperature", [(1, 1.0), (3, 1.0), (5, 2.0), (12, 0.5)])
def test_topk_kl_equals_naive_loop(direction, k, temperature):
    s, t, mask = randn(3, 4, 13, seed=3), randn(3, 4, 13, seed=4), ragged_mask(3, 4, seed=1)
    logp, idx = teacher_topk(t, k, temperature)
    torch.testing.assert_close(topk_kl(s, logp, idx, mask, temperature, direction),
                               naive_topk_kl_loop(s, t, mask, k, temperature, direction))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("k,temperature", [(1, 1.0), (4, 0.5), (9, 2.0), (50, 1.0)])
def test_kl_zero_for_identical_and_nonnegative(direction, k, temperature):
    z, mask = randn(4, 6, 9, seed=5, scale=4.0), torch.ones(4, 6, dtype=torch.bool)
    logp, idx = teacher_topk(z, k, temperature)
    torch.testing.assert_close(topk_kl(z, logp, idx, mask, temperature, direction), torch.zeros(4, 6, dtype=z.dtype))
    torch.testing.assert_close(full_kl(z, z, mask, temperature, direction), torch.zeros(4, 6, dtype=z.dtype))
    for seed in range(5):
        s = randn(4, 6, 9, seed=10 + seed, scale=4.0)
        assert (topk_kl(s, logp, idx, mask, temperature, direction) >= 0).all()
        assert (full_kl(s, z, mask, temperature, direction) >= 0).all()


def test_topk_kl_hand_computed_v3():
    # Teacher logits (ln 6, ln 3, ln 1): softmax (0.6, 0.3, 0.1); its top 2 renormalized: (2/3, 1/3).
    # Student logits (0, 0, 5): on the same two tokens, renormalized: (1/2, 1/2); its 5 is outside the set.
    # forward = 2/3 ln((2/3)/(1/2)) + 1/3 ln((1/3)/(1/2)) = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.0566330...
    # reverse = 1/2 ln((1/2)/(2/3)) + 1/2 ln((1/2)/(1/3)) = 1/2 ln(9/8) = 0.0588915...
    # At T = 2 the teacher's top 2 become (sqrt 6, sqrt 3) / (sqrt 6 + sqrt 3) = (sqrt 2, 1) / (sqrt 2 + 1),
    # the student stays (1/2, 1/2), and the T^2 = 4 factor applies.
    teacher = torch.tensor([[[math.log(6), math.log(3), 0.0]]], dtype=torch.float64)
    student = torch.tensor([[[0.0, 0.0, 5.0]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    logp, idx = teacher_topk(teacher, k=2, temperature=1.0)
    assert idx.tolist() == [[[0, 1]]]
    forward = topk_kl(student, logp, idx, mask, 1.0, "forward").item()
    reverse = topk_kl(student, logp, idx, mask, 1.0, "reverse").item()
    assert forward == pytest.approx(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3), abs=1e-12)
    assert forward == pytest.approx(0.0566330, abs=1e-7)
    assert reverse == pytest.approx(0.5 * math.log(9 / 8), abs=1e-12)
    p = math.sqrt(2) / (math.sqrt(2) + 1)
    logp2, idx2 = teacher_topk(teacher, k=2, temperature=2.0)
    expected_t2 = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert topk_kl(student, logp2, idx2, mask, 2.0).item() == pytest.approx(expected_t2, abs=1e-12)


def test_topk_kl_pinned_value():
    # Inputs from a formula, not a random generator, so the pin does not depend on torch's RNG.
    n = torch.arange(2 * 3 * 7, dtype=torch.float32)
    student = (3.0 * torch.sin(0.37 * n + 0.1)).view(2, 3, 7)
    teacher = (2.5 * torch.cos(0.53 * n + 0.2)).view(2, 3, 7)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    logp, idx = teacher_topk(teacher, k=4, temperature=1.5)
    assert topk_kl(student, logp, idx, mask, 1.5, "forward").sum().item() == pytest.approx(3.2010132, abs=1e-5)
    assert topk_kl(student, logp, idx, mask, 1.5, "reverse").sum().item() == pytest.approx(3.4043724, abs=1e-5)


# --- gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", DIRECTIONS)
def test_topk_kl_gradcheck(direction):
    s, t, mask = randn(2, 3, 6, seed=6).requires_grad_(), randn(2, 3, 6, seed=7), ragged_mask(2, 3)
    mask[0, 0] = True
    logp, idx = teacher_topk(t, 4, 1.5)
    assert torch.autograd.gradcheck(lambda x: topk_kl(x, logp, idx, mask, 1.5, direction), (s,))


def test_chunked_gradcheck_wrt_hidden_and_head():
    B, T, D, V = 2, 5, 3, 7
    h, W = randn(B, T, D, seed=8).requires_grad_(), randn(V, D, seed=9, scale=1.0).requires_grad_()
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, True]])
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    logp, idx = chunked_teacher_topk(randn(B, T, D, seed=10), linear_head(randn(V, D, seed=11)), 4, 1.5, chunk=2)
    for direction in DIRECTIONS:
        assert torch.autograd.gradcheck(
            lambda h, W, d=direction: chunked_topk_kl(h, linear_head(W), logp, idx, mask, 1.5, d, chunk=2), (h, W))
    assert torch.autograd.gradcheck(lambda h, W: chunked_token_ce(h, linear_head(W), labels, mask, chunk=2), (h, W))


# --- chunked == unchunked -------------------------------------------------------------------------

def values_and_grads(loss_fn, h, W):
    h, W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    out = loss_fn(h, W)
    (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()  # uneven weights
    return out.detach(), h.grad, W.grad


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])  # T = 5: chunks that divide it, that do not, and one > T
def test_chunked_equal_unchunked(chunk):
    B, T, D, V, K = 3, 5, 4, 17, 6
    h, W = randn(B, T, D, seed=12), randn(V, D, seed=13, scale=0.7)
    h_teacher, W_teacher = randn(B, T, D, seed=14), randn(V, D, seed=15, scale=0.7)
    mask = ragged_mask(B, T, seed=3)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))

    logp_c, idx_c = chunked_teacher_topk(h_teacher, linear_head(W_teacher), K, 1.3, chunk=chunk)
    logp, idx = teacher_topk(F.linear(h_teacher, W_teacher), K, 1.3)
    torch.testing.assert_close(idx_c, idx)
    torch.testing.assert_close(logp_c, logp)
    assert not logp_c.requires_grad

    pairs = [(lambda h, W: chunked_token_ce(h, linear_head(W), labels, mask, chunk=chunk),
              lambda h, W: token_ce(F.linear(h, W), labels, mask))]
    for d in DIRECTIONS:
        pairs.append((lambda h, W, d=d: chunked_topk_kl(h, linear_head(W), logp, idx, mask, 1.3, d, chunk=chunk),
                      lambda h, W, d=d: topk_kl(F.linear(h, W), logp, idx, mask, 1.3, d)))
    for chunked_fn, plain_fn in pairs:
        for got, want in zip(values_and_grads(chunked_fn, h, W), values_and_grads(plain_fn, h, W)):
            torch.testing.assert_close(got, want)


def test_chunked_forward_keeps_no_vocabulary_sized_activation():
    # Without checkpointing, autograd would keep each chunk's (B, chunk, V) logits (gather and
    # log_softmax save them). Checkpointed, the forward keeps nothing whose last dim is V.
    B, T, D, V = 3, 5, 4, 17
    h, W = randn(B, T, D).requires_grad_(), randn(V, D).requires_grad_()
    mask, labels = torch.ones(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.long)
    logp, idx = teacher_topk(F.linear(h.detach(), W.detach()), 6, 1.0)
    saved = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        losses = chunked_token_ce(h, linear_head(W), labels, mask, chunk=2) + \
            chunked_topk_kl(h, linear_head(W), logp, idx, mask, 1.0, chunk=2)
    assert not [shape for shape in saved if shape[-1:] == (V,)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):  # the control: unchunked keeps them
        token_ce(F.linear(h, W), labels, mask)
    assert [shape for shape in saved if shape[-1:] == (V,)]
    losses.sum().backward()
    assert torch.isfinite(W.grad).all()


def test_chunked_runs_without_grad():
    h, W = randn(2, 5, 3), randn(7, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    logp, idx = teacher_topk(F.linear(h, W), 3, 1.0)
    with torch.no_grad():
        kl = chunked_topk_kl(h, linear_head(W), logp, idx, mask, 1.0, chunk=2)
    torch.testing.assert_close(kl, torch.zeros(2, 5, dtype=kl.dtype))


# --- the normalization rule: 8x1 == 2x4 ------------------------------------------------------------

def test_reduce_step_8x1_equals_2x4():
    B, T, D, V, K = 8, 6, 4, 11, 5
    h, W0 = randn(B, T, D, seed=20), randn(V, D, seed=21, scale=0.7)
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T), a different number of valid tokens per row
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    logp, idx = teacher_topk(F.linear(randn(B, T, D, seed=22), randn(V, D, seed=23)), K, 1.0)
    n_step = int(mask.sum())

    def step_loss(W, rows):
        ce = chunked_token_ce(h[rows], linear_head(W), labels[rows], mask[rows], chunk=4)
        kl = chunked_topk_kl(h[rows], linear_head(W), logp[rows], idx[rows], mask[rows], 1.0, chunk=4)
        return reduce_step(ce, mask[rows], n_step) + 0.7 * reduce_step(kl, mask[rows], n_step)

    W_full = W0.clone().requires_grad_()
    loss_full = step_loss(W_full, slice(0, 8))
    loss_full.backward()

    W_acc = W0.clone().requires_grad_()
    loss_acc = 0.0
    for start in range(0, B, 2):
        micro = step_loss(W_acc, slice(start, start + 2))
        micro.backward()  # gradients accumulate in W_acc.grad, as in a training loop
        loss_acc += micro.item()

    assert loss_acc == pytest.approx(loss_full.item(), abs=1e-12)
    torch.testing.assert_close(W_acc.grad, W_full.grad)

    # Control: dividing each micro-batch by its own count gives another loss, so the test can fail.
    per_micro = sum(reduce_step(token_ce(F.linear(h[s], W0), labels[s], mask[s]), mask[s], int(mask[s].sum()))
                    for s in (slice(i, i + 2) for i in range(0, B, 2))) / 4
    full_ce = reduce_step(token_ce(F.linear(h, W0), labels, mask), mask, n_step)
    assert abs(per_micro.item() - full_ce.item()) > 1e-3


def test_reduce_step_value_and_empty_step():
    losses = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert reduce_step(losses, mask, 6).item() == pytest.approx(1.0)  # (1 + 2 + 3) / 6
    assert reduce_step(losses, mask, torch.tensor(3)).item() == pytest.approx(2.0)
    assert reduce_step(losses, mask, 0.5).item() == pytest.approx(12.0)  # a count divided over ranks
    assert reduce_step(losses, torch.zeros_like(mask), 0).item() == 0.0
    assert reduce_step(losses, torch.zeros_like(mask), torch.tensor(0)).item() == 0.0
    with pytest.raises(ValueError):
        reduce_step(losses, mask, -1)


# --- EMABalancer ----------------------------------------------------------------------------------

def test_ema_balancer_hand_computed():
    bal = EMABalancer(decay=0.9, eps=1e-8)
    # step 1: m_ce = 0.1 * 2 = 0.2, m_kl = 0.1 * 0.5 = 0.05; corrected by 1 - 0.9 = 0.1: 2 and 0.5 -> lambda 4
    lam1 = bal.update(2.0, 0.5)
    assert isinstance(lam1, float)
    assert lam1 == pytest.approx(4.0, rel=1e-7)
    assert lam1 == pytest.approx(2.0 / (0.5 + 1e-8), rel=1e-12)
    # step 2: m_ce = 0.9 * 0.2 + 0.1 * 1 = 0.28, m_kl = 0.9 * 0.05 + 0.1 * 1 = 0.145; corrected by 1 - 0.81 = 0.19
    lam2 = bal.update(1.0, 1.0)
    assert lam2 == pytest.approx((0.28 / 0.19) / (0.145 / 0.19 + 1e-8), rel=1e-12)
    assert lam2 == pytest.approx(0.28 / 0.145, rel=1e-7)  # the correction cancels in the ratio, up to eps
    # step 3: m_ce = 0.9 * 0.28 + 0.1 * 3 = 0.552, m_kl = 0.9 * 0.145 + 0.1 * 0.25 = 0.1555; corrected by 0.271
    lam3 = bal.update(3.0, 0.25)
    assert lam3 == pytest.approx((0.552 / 0.271) / (0.1555 / 0.271 + 1e-8), rel=1e-12)


def test_ema_balancer_first_step_is_exact_ratio_and_eps_guards_zero():
    assert EMABalancer().update(0.37, 0.11) == pytest.approx(0.37 / 0.11, rel=1e-7)
    assert EMABalancer(eps=1e-8).update(1.0, 0.0) == pytest.approx(1e8)


def test_ema_balancer_state_dict_round_trip():
    losses = [(2.0, 0.5), (1.5, 0.7), (1.2, 0.4), (0.9, 0.6), (1.1, 0.3)]
    a = EMABalancer()
    for ce, kl in losses[:2]:
        a.update(ce, kl)
    state = json.loads(json.dumps(a.state_dict()))  # plain numbers: survives JSON as well as torch.save
    b = EMABalancer()
    b.load_state_dict(state)
    assert [a.update(ce, kl) for ce, kl in losses[2:]] == [b.update(ce, kl) for ce, kl in losses[2:]]
    with pytest.raises(ValueError):
        EMABalancer(decay=0.8).load_state_dict(state)


def test_ema_balancer_detaches_tensors_and_rejects_nan():
    ce = torch.tensor(2.0, requires_grad=True) * 1.0
    lam = EMABalancer().update(ce, torch.tensor(0.5))
    assert type(lam) is float
    with pytest.raises(ValueError):
        EMABalancer().update(float("nan"), 1.0)
    with pytest.raises(ValueError):
        EMABalancer(decay=1.0)


# --- edges: empty masks, bf16, validation ---------------------------------------------------------

def test_all_false_mask_gives_zeros_and_finite_gradients():
    B, T, D, V = 2, 4, 3, 7
    mask = torch.zeros(B, T, dtype=torch.bool)
    s, t = randn(B, T, V).requires_grad_(), randn(B, T, V, seed=1)
    h, W = randn(B, T, D).requires_grad_(), randn(V, D).requires_grad_()
    labels = torch.full((B, T), -100)
    logp = torch.full((B, T, 3), float("nan"), dtype=torch.float64)  # padding the caller may leave
    idx = torch.full((B, T, 3), -1)
    outs = [token_ce(s, labels, mask), topk_kl(s, logp, idx, mask, 1.0), topk_kl(s, logp, idx, mask, 1.0, "reverse"),
            full_kl(s, t, mask, 2.0), chunked_token_ce(h, linear_head(W), labels, mask, chunk=3),
            chunked_topk_kl(h, linear_head(W), logp, idx, mask, 1.0, chunk=3)]
    for out in outs:
        assert torch.equal(out, torch.zeros(B, T, dtype=out.dtype))
        reduce_step(out, mask, 0).backward()
    for x in (s, h, W):
        assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_kl_with_impossible_teacher_tokens(direction):
    # A teacher logit of -inf (a banned or padding token) has probability 0: 0 log 0 = 0 in the forward
    # KL, no NaN in values or gradients. In the reverse KL the student's mass there makes it +inf.
    s, t = randn(2, 3, 6, seed=30), randn(2, 3, 6, seed=31)
    t[..., 4:] = float("-inf")
    mask = torch.ones(2, 3, dtype=torch.bool)
    s.requires_grad_()
    logp, idx = teacher_topk(t, 6, 1.0)
    if direction == "forward":
        expected = naive_kl_div(s[..., :4], t[..., :4], 1.0, "forward")  # the same KL on the possible tokens
        expected = expected + torch.logsumexp(s, -1) - torch.logsumexp(s[..., :4], -1)  # minus log q's mass there
        for kl in (full_kl(s, t, mask, 1.0), topk_kl(s, logp, idx, mask, 1.0)):
            torch.testing.assert_close(kl, expected)
            kl.sum().backward()
            assert torch.isfinite(s.grad).all()
            s.grad = None
    else:
        assert torch.isinf(full_kl(s, t, mask, 1.0, "reverse")).all()
        assert torch.isinf(topk_kl(s, logp, idx, mask, 1.0, "reverse")).all()
    # with K = 4 the impossible tokens are not in the set: finite both ways
    logp4, idx4 = teacher_topk(t, 4, 1.0)
    torch.testing.assert_close(topk_kl(s, logp4, idx4, mask, 1.0, direction),
                               naive_kl_div(s[..., :4], t[..., :4], 1.0, direction))


def test_bf16_inputs_compute_in_fp32():
    B, T, V = 2, 5, 50
    s32, t32 = randn(B, T, V, dtype=torch.float32), randn(B, T, V, seed=1, dtype=torch.float32)
    s16, t16 = s32.bfloat16(), t32.bfloat16()
    mask = ragged_mask(B, T)
    mask[0, 0] = True
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(6))
    logp16, idx16 = teacher_topk(t16, 8, 1.5)
    logp32, idx32 = teacher_topk(t32, 8, 1.5)
    assert logp16.dtype == torch.float32 and idx16.dtype == torch.int64
    cases = [(token_ce(s16, labels, mask), token_ce(s16.float(), labels, mask), token_ce(s32, labels, mask)),
             (topk_kl(s16, logp16, idx16, mask, 1.5), topk_kl(s16.float(), logp16, idx16, mask, 1.5),
              topk_kl(s32, logp32, idx32, mask, 1.5)),
             (full_kl(s16, t16, mask, 1.5), full_kl(s16.float(), t16.float(), mask, 1.5), full_kl(s32, t32, mask, 1.5))]
    for bf16, same_values_fp32, fp32 in cases:
        assert bf16.dtype == torch.float32
        torch.testing.assert_close(bf16, same_values_fp32)  # upcast before any arithmetic: identical
        torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.02)  # only the inputs' rounding differs


def test_chunked_bf16_head_gives_fp32():
    h, W = randn(2, 5, 3, dtype=torch.bfloat16), randn(7, 3, dtype=torch.bfloat16)
    mask, labels = torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.long)
    logp, idx = chunked_teacher_topk(h, linear_head(W), 4, 1.0, chunk=2)
    assert logp.dtype == torch.float32
    assert chunked_topk_kl(h, linear_head(W), logp, idx, mask, 1.0, chunk=2).dtype == torch.float32
    ce = chunked_token_ce(h, linear_head(W), labels, mask, chunk=2)
    torch.testing.assert_close(ce, token_ce(F.linear(h, W).float(), labels, mask))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature_must_be_positive(temperature):
    z, mask = randn(1, 2, 5), torch.ones(1, 2, dtype=torch.bool)
    logp, idx = teacher_topk(z, 3, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        teacher_topk(z, 3, temperature)
    with pytest.raises(ValueError, match="temperature"):
        topk_kl(z, logp, idx, mask, temperature)
    with pytest.raises(ValueError, match="temperature"):
        full_kl(z, z, mask, temperature)


def test_direction_k_chunk_and_mask_are_validated():
    z, mask = randn(1, 2, 5), torch.ones(1, 2, dtype=torch.bool)
    logp, idx = teacher_topk(z, 3, 1.0)
    with pytest.raises(ValueError, match="direction"):
        topk_kl(z, logp, idx, mask, 1.0, "backward")
    with pytest.raises(ValueError, match="direction"):
        full_kl(z, z, mask, 1.0, "Forward")
    with pytest.raises(ValueError, match="k must"):
        teacher_topk(z, 0, 1.0)
    with pytest.raises(ValueError, match="chunk"):
        chunked_teacher_topk(randn(1, 2, 3), linear_head(randn(5, 3)), 3, 1.0, chunk=0)
    with pytest.raises(ValueError, match="mask"):
        token_ce(z, torch.zeros(1, 2, dtype=torch.long), mask.double())
    with pytest.raises(ValueError, match="mask"):
        token_ce(z, torch.zeros(1, 2, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(token_ce(z, torch.zeros(1, 2, dtype=torch.long), mask.long()),  # 0/1 ints are masks
                               token_ce(z, torch.zeros(1, 2, dtype=torch.long), mask))


# --- TALR and L2-SP ----------------------------------------------------------------------------------

def test_talr_weights_on_known_probabilities():
    from raftune.losses import talr_weights

    p = torch.tensor([[0.9, 0.5, 0.01, 1e-9]])  # the target tokens' probabilities
    mask = torch.tensor([[True, True, True, True]])
    w = talr_weights(-torch.log(p), mask, tau=0.5)  # p^(1/0.5) = p^2, clamped at 0.01; p clamped at 1e-6
    assert torch.allclose(w, torch.tensor([[0.81, 0.25, 0.01, 0.01]]), atol=1e-6)
    w1 = talr_weights(-torch.log(p), torch.tensor([[True, False, True, True]]), tau=2.0)  # p^0.5
    assert torch.allclose(w1, torch.tensor([[0.9 ** 0.5, 0.0, 0.1, 0.01]]), atol=1e-6)  # 1e-6 ** 0.5 < 0.01
    ce = -torch.log(p).requires_grad_()
    assert not talr_weights(ce, mask, 1.0).requires_grad  # a stop-gradient
    with pytest.raises(ValueError):
        talr_weights(ce, mask, 0.0)


def test_talr_loss_is_weighted_ce_over_answer_tokens_and_tau_is_the_median_sequence_nll():
    from raftune.losses import reduce_step, talr_tau, talr_weights

    ce = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    assert talr_tau(ce, mask) == pytest.approx(2.0)  # per-sequence means 2.0, 2.0, 0.5
    assert talr_tau(ce, torch.zeros_like(mask)) == 1.0  # nothing to measure: a neutral tau
    w = talr_weights(ce, mask, 2.0)
    loss = reduce_step(w * ce, mask, int(mask.sum()))
    expected = sum(math.exp(-c / 2.0) * c for c in (1.0, 3.0, 2.0, 0.5, 0.5, 0.5)) / 6
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_l2sp_penalty_and_its_gradient():
    from raftune.losses import l2sp_penalty

    w0 = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    w = [torch.tensor([1.5, -1.0], requires_grad=True), torch.tensor([[0.0]], requires_grad=True)]
    pen = l2sp_penalty(w, w0)
    assert float(pen.detach()) == pytest.approx(0.25 + 1.0 + 0.25)
    pen.backward()
    assert torch.allclose(w[0].grad, 2 * (w[0].detach() - w0[0])) and torch.allclose(w[1].grad, torch.tensor([[-1.0]]))
    assert float(l2sp_penalty([t.detach() for t in w0], w0)) == 0.0


# --- the anchor (forgetting budget) ----------------------------------------------------------------

def test_anchor_kl_equals_naive_full_vocabulary_kl_div():
    """KL(p_original || p_student) per token, from the original's log-probs: F.kl_div over the vocabulary."""
    student, original = randn(3, 5, 11, seed=1), randn(3, 5, 11, seed=2)
    mask = ragged_mask(3, 5)
    out = anchor_kl(student, F.log_softmax(original, -1), mask)
    ref = F.kl_div(F.log_softmax(student, -1), F.log_softmax(original, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(out, ref.masked_fill(~mask, 0.0), atol=1e-12)
    assert torch.allclose(out, full_kl(student, original, mask, temperature=1.0), atol=1e-12)  # the drift suite's per-token KL
    assert float(anchor_kl(original, F.log_softmax(original, -1), mask).abs().max()) < 1e-12  # identical: 0
    assert (out >= 0).all()


def test_anchor_kl_pinned_value_and_gradient_is_soft_label_ce():
    # V = 2: p_original = (0.5, 0.5), student logits (0, ln 3): p_student = (0.25, 0.75)
    student = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64, requires_grad=True)
    logp = torch.log(torch.tensor([[[0.5, 0.5]]], dtype=torch.float64))
    kl = anchor_kl(student, logp, torch.ones(1, 1, dtype=torch.bool))
    assert float(kl) == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-12)
    kl.sum().backward()
    assert student.grad[0, 0].tolist() == pytest.approx([0.25 - 0.5, 0.75 - 0.5], rel=1e-12)  # p_student - p_original
    assert torch.autograd.gradcheck(lambda z: anchor_kl(z, F.log_softmax(randn(2, 3, 7, seed=4), -1), ragged_mask(2, 3)),
                                    (randn(2, 3, 7, seed=3).requires_grad_(),))


def test_anchor_kl_masked_positions_give_zero_and_finite_gradients():
    student = randn(2, 4, 9, seed=5).requires_grad_()
    logp = torch.full((2, 4, 9), float("-inf"), dtype=torch.float64)  # padding the caller never filled
    mask = torch.zeros(2, 4, dtype=torch.bool)
    out = anchor_kl(student, logp, mask)
    out.sum().backward()
    assert float(out.abs().max()) == 0.0 and torch.isfinite(student.grad).all() and float(student.grad.abs().max()) == 0.0


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_anchor_kl_and_log_probs_equal_unchunked(chunk):
    h, W = randn(2, 7, 4, seed=6, scale=1.0), randn(13, 4, seed=7, scale=1.0).requires_grad_()
    W_orig = randn(13, 4, seed=8, scale=1.0)
    mask = ragged_mask(2, 7, seed=1)
    logp = chunked_log_probs(h, linear_head(W_orig), chunk)
    assert torch.allclose(logp, F.log_softmax(h @ W_orig.T, -1), atol=1e-12) and not logp.requires_grad
    out = chunked_anchor_kl(h, linear_head(W), logp, mask, chunk)
    ref = anchor_kl(h @ W.T, logp, mask)
    assert torch.allclose(out, ref, atol=1e-12)
    (g_out,) = torch.autograd.grad(out.sum(), W)
    (g_ref,) = torch.autograd.grad(ref.sum(), W)
    assert torch.allclose(g_out, g_ref, atol=1e-12)


# --- the budget's controller -----------------------------------------------------------------------

def controller(**kw):
    return BudgetController(**{"budget": 0.05, "mu": 1.0, "rate": 0.5, "bounds": (0.01, 100.0), "warmup": 0, **kw})


def test_controller_raises_mu_over_budget_and_lowers_it_under():
    c = controller()
    over = [c.update(d, step) for step, d in enumerate([0.1, 0.08, 0.06], start=1)]  # drift above B = 0.05
    assert over[0] > 1.0 and over[0] < over[1] < over[2]
    assert over[0] == pytest.approx(math.exp(0.5 * 1.0), rel=1e-12)  # (0.1 - 0.05) / 0.05 = 1
    assert over[2] / over[1] == pytest.approx(math.exp(0.5 * 0.2), rel=1e-12)  # (0.06 - 0.05) / 0.05 = 0.2
    under = [c.update(d, step) for step, d in enumerate([0.04, 0.02, 0.0], start=4)]
    assert over[2] > under[0] > under[1] > under[2]
    assert under[2] / under[1] == pytest.approx(math.exp(-0.5), rel=1e-12)  # (0 - 0.05) / 0.05 = -1
    on = c.update(0.05, 7)  # on budget, but risen from 0: the derivative term alone, (0.05 - 0) / 0.05 = 1
    assert on == pytest.approx(under[2] * math.exp(0.5), rel=1e-12)
    assert c.update(0.05, 8) == pytest.approx(on, rel=1e-12)  # on budget and steady: no change
    plain = controller(derivative=0.0)  # plain dual ascent: the error alone
    assert [plain.update(d, s) for s, d in ((1, 0.02), (2, 0.05))] == [pytest.approx(math.exp(-0.3), rel=1e-12)] * 2


def test_controller_acts_on_a_rising_drift_before_it_crosses_the_budget():
    """The derivative term: a drift climbing toward B raises mu ahead of the crossing, where plain dual
    ascent would still be lowering it; over budget mu never falls, however fast the drift comes down."""
    rising = [0.01, 0.02, 0.035, 0.045]  # under B = 0.05 throughout
    pid, plain = controller(), controller(derivative=0.0)
    mus = [pid.update(d, s) for s, d in enumerate(rising, start=1)]
    assert mus[0] < 1.0 and mus[-1] > mus[-2]  # the last rise, 0.01 / 0.05 = 0.2, outweighs the error, -0.1
    assert mus[-1] / mus[-2] == pytest.approx(math.exp(0.5 * (-0.1 + 0.2)), rel=1e-12)
    plain_mus = [plain.update(d, s) for s, d in enumerate(rising, start=1)]
    assert all(b < a for a, b in zip([1.0] + plain_mus, plain_mus))  # every error < 0: plain ascent only lowers it
    assert mus[-1] > plain_mus[-1]
    falling = controller(mu=4.0)
    over = [falling.update(d, s) for s, d in enumerate([0.2, 0.06, 0.051], start=1)]
    assert over[0] < over[1] < over[2]  # a falling drift gives no negative derivative term


def test_controller_stays_within_its_bounds_and_each_step_is_bounded():
    c = controller(bounds=(0.1, 10.0), rate=1.0)
    seen = [c.update(1e6, step) for step in range(1, 20)]  # far over budget: clipped error 1 per measurement
    assert seen[0] == pytest.approx(math.e, rel=1e-12) and max(seen) == 10.0 and seen[-1] == 10.0
    seen = [c.update(0.0, step) for step in range(20, 40)]
    assert min(seen) == pytest.approx(0.1) and seen[-1] == pytest.approx(0.1)
    assert all(0.1 <= mu <= 10.0 for mu in seen)
    assert controller(mu=1e9, bounds=(0.1, 10.0)).mu == 10.0  # the start is projected too


def test_controller_holds_mu_during_warmup_and_at_step_0():
    c = controller(warmup=5)
    assert [c.update(1.0, step) for step in (0, 1, 4)] == [1.0, 1.0, 1.0] and c.updates == 0
    assert c.update(1.0, 5) > 1.0 and c.updates == 1
    assert controller().update(0.0, 0) == 1.0  # step 0: drift 0 by construction says nothing


def test_controller_state_dict_resumes_exactly_and_checks_its_settings():
    drifts = [0.09, 0.07, 0.03, 0.06, 0.05, 0.01]
    a = controller()
    for step, d in enumerate(drifts[:3], start=1):
        a.update(d, step)
    b = controller()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.update(d, s) for s, d in enumerate(drifts[3:], start=4)] == [b.update(d, s) for s, d in enumerate(drifts[3:], start=4)]
    with pytest.raises(ValueError, match="saved controller has budget=0.05"):
        controller(budget=0.1).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="drift must be finite"):
        a.update(float("nan"), 9)
    for bad in ({"budget": 0.0}, {"rate": -1.0}, {"bounds": (1.0, 0.5)}, {"bounds": (0.0, 1.0)}):
        with pytest.raises(ValueError):
            controller(**bad)
