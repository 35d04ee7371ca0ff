"""RAFT's losses (paper Eq. 5 and 8-12) as pure functions over tensors: no model code, no I/O.

Shapes: B batch, T positions, V vocabulary, D hidden, K top-K. Every loss returns per-token values
(B, T), 0 where the mask is False, and `reduce_step` is the one place where they are reduced.
Position t of the logits predicts label t: callers shift before calling.

Precision: bf16 / fp16 inputs are computed in fp32 and give fp32 outputs; fp64 stays fp64 (the
tests' gradchecks use it). Upcasting happens after any gather or top-k, so no fp32 copy of a
(B, T, V) tensor is made that the computation does not need.

Top-K distillation (Eq. 8-10): p_T = softmax(z_T / T), p_S = softmax(z_S / T), both restricted to
the teacher's top-K tokens at each position and renormalized there; the per-token loss is
T^2 * KL(p~_T || p~_S) (forward, the paper's reading) or T^2 * KL(p~_S || p~_T) (reverse).
K and T are the caller's: the paper's K is 512; its T is lost from the text (1.0 is our inferred default).

The forgetting budget's pieces sit here too: `anchor_kl`, the full-vocabulary KL(original || student)
of the general-behaviour anchor, and `BudgetController`, the dual-ascent rule for its weight, beside
`EMABalancer` (the paper's lambda rule, untouched).

Memory: `chunked_*` take hidden states and the LM head instead of logits and compute the logits
`chunk` positions at a time, so the student's full (B, T, V) fp32 logits never exist at once;
each chunk runs under activation checkpointing, so its backward recomputes the chunk's logits
instead of keeping them (one more LM-head matmul per chunk). A chunk holds B * chunk * V logits:
at B 16 and V 49,152, chunk 256 is 0.75 GiB in fp32 and chunk 64 0.19 GiB, at about the same speed
(benchmarks/kl_loss.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DIRECTIONS = ("forward", "reverse")

LMHead = Callable[[Tensor], Tensor]  # (B, T, D) -> (B, T, V): an nn.Linear, or any module or function


# --- checks and helpers ---------------------------------------------------------------------------

def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _check_chunk(chunk: int) -> None:
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")


def _as_mask(mask_BT: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A bool mask of `shape`; 0/1 integer masks are accepted, float ones are not (they look like weights)."""
    if mask_BT.is_floating_point() or mask_BT.is_complex():
        raise ValueError(f"mask must be bool or 0/1 integers, got {mask_BT.dtype}: per-token weights are not masks")
    if tuple(mask_BT.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask_BT.shape)}, expected {tuple(shape)}")
    return mask_BT if mask_BT.dtype == torch.bool else mask_BT != 0


def _upcast(x: Tensor) -> Tensor:
    """Half precisions to fp32; fp32 and fp64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _kl(logp_BTV: Tensor, logq_BTV: Tensor, direction: str) -> Tensor:
    """(B, T): KL(p || q) summed over the last dim (forward), or KL(q || p) (reverse). Inputs are log-probs."""
    if direction == "reverse":
        logp_BTV, logq_BTV = logq_BTV, logp_BTV
    p_BTV = logp_BTV.exp()
    # 0 * log 0 = 0: a token with probability 0 contributes nothing. The where sits inside the product
    # so a -inf log-prob gives a 0 gradient, not 0 * inf = NaN.
    diff_BTV = torch.where(p_BTV > 0, logp_BTV - logq_BTV, 0.0)
    return (p_BTV * diff_BTV).sum(-1)


# --- per-token losses on logits -------------------------------------------------------------------

def token_ce(logits_BTV: Tensor, labels_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Per-token cross-entropy (paper Eq. 5 before reduction).

    logits_BTV (B, T, V), any float dtype; labels_BT (B, T) token ids, anything (e.g. -100) where the
    mask is False; mask_BT (B, T) bool. logits[:, t] predicts labels[:, t] (the caller has shifted).
    Returns (B, T) in fp32 (fp64 for fp64 logits), 0 where the mask is False.
    """
    B, T, V = logits_BTV.shape
    mask_BT = _as_mask(mask_BT, (B, T))
    if tuple(labels_BT.shape) != (B, T):
        raise ValueError(f"labels have shape {tuple(labels_BT.shape)}, expected {(B, T)}")
    safe_labels_BT = labels_BT.masked_fill(~mask_BT, 0)  # padding labels never index
    ce_N = F.cross_entropy(_upcast(logits_BTV).reshape(B * T, V), safe_labels_BT.reshape(B * T), reduction="none")
    return ce_N.view(B, T).masked_fill(~mask_BT, 0.0)


def teacher_topk(teacher_logits_BTV: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The teacher's top-k tokens of softmax(z / T) and their log-probs renormalized over those k.

    teacher_logits_BTV (B, T, V). k is clamped to V, so K = min(k, V). Returns (logp_BTK, idx_BTK):
    logp_BTK (B, T, K) fp32 = log_softmax of the K selected z / T values (their exp sums to 1 at
    every position), idx_BTK (B, T, K) int64 vocabulary ids, in decreasing order of probability.
    """
    temperature = _check_temperature(temperature)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    K = min(int(k), teacher_logits_BTV.shape[-1])
    z_BTK, idx_BTK = teacher_logits_BTV.topk(K, dim=-1)  # z / T has the order of z because T > 0
    logp_BTK = torch.log_softmax(_upcast(z_BTK) / temperature, dim=-1)
    return logp_BTK, idx_BTK


def topk_kl(student_logits_BTV: Tensor, teacher_logp_BTK: Tensor, teacher_idx_BTK: Tensor, mask_BT: Tensor,
            temperature: float, direction: str = "forward") -> Tensor:
    """Per-token top-K temperature KL (paper Eq. 8-10 before reduction), times T^2.

    student_logits_BTV (B, T, V); teacher_logp_BTK, teacher_idx_BTK (B, T, K) from `teacher_topk`
    (any values where the mask is False, e.g. -1 padding ids); mask_BT (B, T) bool.
    p~_S = softmax of the student's K logits at teacher_idx, divided by T; p~_T = exp(teacher_logp).
    forward: sum_v p~_T(v) (log p~_T(v) - log p~_S(v)); reverse: sum_v p~_S(v) (log p~_S(v) - log p~_T(v)).
    Returns (B, T) in fp32 (fp64 for fp64 inputs), 0 where the mask is False.
    """
    temperature = _check_temperature(temperature)
    _check_direction(direction)
    B, T, _ = student_logits_BTV.shape
    mask_BT = _as_mask(mask_BT, (B, T))
    if teacher_idx_BTK.shape != teacher_logp_BTK.shape or tuple(teacher_idx_BTK.shape[:2]) != (B, T):
        raise ValueError(f"teacher log-probs {tuple(teacher_logp_BTK.shape)} and ids {tuple(teacher_idx_BTK.shape)} "
                         f"must both be (B, T, K) with (B, T) = {(B, T)}")
    drop_BT1 = ~mask_BT.unsqueeze(-1)
    idx_BTK = teacher_idx_BTK.masked_fill(drop_BT1, 0)  # padding ids never index
    logp_BTK = _upcast(teacher_logp_BTK).masked_fill(drop_BT1, 0.0)  # finite, so no NaN reaches the gradient
    z_BTK = _upcast(student_logits_BTV.gather(-1, idx_BTK)) / temperature  # gather, then upcast: no fp32 (B, T, V)
    logq_BTK = torch.log_softmax(z_BTK, dim=-1)
    kl_BT = _kl(logp_BTK, logq_BTK, direction) * temperature**2
    return kl_BT.masked_fill(~mask_BT, 0.0)


def full_kl(student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor, temperature: float,
            direction: str = "forward") -> Tensor:
    """Per-token full-vocabulary temperature KL, times T^2: the "full-vocabulary KL" ablation and the naive reference.

    student_logits_BTV, teacher_logits_BTV (B, T, V); mask_BT (B, T) bool. Same as `topk_kl` with
    K = V. Materializes several (B, T, V) fp32 tensors: call it on small batches or chunks.
    Returns (B, T) in fp32 (fp64 for fp64 inputs), 0 where the mask is False.
    """
    temperature = _check_temperature(temperature)
    _check_direction(direction)
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(f"student logits {tuple(student_logits_BTV.shape)} and teacher logits "
                         f"{tuple(teacher_logits_BTV.shape)} differ in shape")
    mask_BT = _as_mask(mask_BT, tuple(student_logits_BTV.shape[:2]))
    logq_BTV = torch.log_softmax(_upcast(student_logits_BTV) / temperature, dim=-1)
    logp_BTV = torch.log_softmax(_upcast(teacher_logits_BTV) / temperature, dim=-1)
    kl_BT = _kl(logp_BTV, logq_BTV, direction) * temperature**2
    return kl_BT.masked_fill(~mask_BT, 0.0)


# --- memory-bounded drivers: hidden states in, per-token losses out --------------------------------

def _t_slices(T: int, chunk: int) -> list[slice]:
    _check_chunk(chunk)
    return [slice(s, s + chunk) for s in range(0, max(T, 1), chunk)]  # T = 0 still runs once, on empty slices


def _checkpointed(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """fn(*args) whose activations are recomputed in the backward instead of stored."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def _check_hidden(hidden_BTD: Tensor, *others_BT: Tensor) -> tuple[int, int]:
    if hidden_BTD.dim() != 3:
        raise ValueError(f"hidden states must be (B, T, D), got shape {tuple(hidden_BTD.shape)}")
    B, T = hidden_BTD.shape[:2]
    for x in others_BT:
        if tuple(x.shape[:2]) != (B, T):
            raise ValueError(f"shape {tuple(x.shape)} does not start with the hidden states' (B, T) = {(B, T)}")
    return B, T


def chunked_token_ce(hidden_BTD: Tensor, lm_head: LMHead, labels_BT: Tensor, mask_BT: Tensor,
                     chunk: int = 256) -> Tensor:
    """`token_ce(lm_head(hidden).float(), labels, mask)` computed `chunk` positions at a time.

    hidden_BTD (B, T, D); lm_head maps (B, c, D) -> (B, c, V); labels_BT, mask_BT (B, T). Each chunk
    is checkpointed: at most one chunk's logits (B, chunk, V) and their softmax exist at a time, in
    the forward and in the backward. Returns (B, T), 0 where the mask is False.
    """
    _, T = _check_hidden(hidden_BTD, labels_BT, mask_BT)

    def ce_chunk(h_BCD: Tensor, labels_BC: Tensor, mask_BC: Tensor) -> Tensor:
        return token_ce(lm_head(h_BCD), labels_BC, mask_BC)

    return torch.cat([_checkpointed(ce_chunk, hidden_BTD[:, s], labels_BT[:, s], mask_BT[:, s])
                      for s in _t_slices(T, chunk)], dim=1)


@torch.no_grad()
def chunked_teacher_topk(hidden_BTD: Tensor, lm_head: LMHead, k: int, temperature: float,
                         chunk: int = 256) -> tuple[Tensor, Tensor]:
    """`teacher_topk(lm_head(hidden), k, temperature)` computed `chunk` positions at a time, without gradients.

    Only the result, (B, T, K) log-probs (fp32) and ids (int64), is kept; the teacher's logits exist
    one chunk (B, chunk, V) at a time.
    """
    _, T = _check_hidden(hidden_BTD)
    parts = [teacher_topk(lm_head(hidden_BTD[:, s]), k, temperature) for s in _t_slices(T, chunk)]
    return torch.cat([logp for logp, _ in parts], dim=1), torch.cat([idx for _, idx in parts], dim=1)


def chunked_topk_kl(hidden_BTD: Tensor, lm_head: LMHead, teacher_logp_BTK: Tensor, teacher_idx_BTK: Tensor,
                    mask_BT: Tensor, temperature: float, direction: str = "forward", chunk: int = 256) -> Tensor:
    """`topk_kl(lm_head(hidden), teacher_logp, teacher_idx, mask, ...)` computed `chunk` positions at a time.

    hidden_BTD (B, T, D) are the student's; teacher_logp_BTK, teacher_idx_BTK (B, T, K) come from
    `chunked_teacher_topk` (or `teacher_topk`). Each chunk is checkpointed, so the student's logits
    exist one chunk (B, chunk, V) at a time in the forward and in the backward. Returns (B, T).
    """
    temperature = _check_temperature(temperature)
    _check_direction(direction)
    _, T = _check_hidden(hidden_BTD, teacher_logp_BTK, teacher_idx_BTK, mask_BT)

    def kl_chunk(h_BCD: Tensor, logp_BCK: Tensor, idx_BCK: Tensor, mask_BC: Tensor) -> Tensor:
        return topk_kl(lm_head(h_BCD), logp_BCK, idx_BCK, mask_BC, temperature, direction)

    return torch.cat([_checkpointed(kl_chunk, hidden_BTD[:, s], teacher_logp_BTK[:, s], teacher_idx_BTK[:, s],
                                    mask_BT[:, s])
                      for s in _t_slices(T, chunk)], dim=1)


# --- the one reduction ------------------------------------------------------------------------------

def reduce_step(token_losses_BT: Tensor, mask_BT: Tensor, n_step_tokens: int | float | Tensor) -> Tensor:
    """Scalar loss of one micro-batch: the sum of its valid tokens' losses / `n_step_tokens`.

    THE normalization rule of raftune: `n_step_tokens` is the number of valid tokens in the whole
    optimizer step, over all micro-batches of the gradient accumulation, not in this micro-batch.
    Summing `reduce_step` over the micro-batches (calling backward on each) then gives the mean
    over the step's tokens, and the same loss and gradient whatever the split: 8 sequences as 1x8
    or as 4 micro-batches of 2 update identically, and a long sequence weighs as many tokens as it
    has. Dividing each micro-batch by its own count would not (short micro-batches would weigh more).

    Each loss term has its own count: CE over the SFT answer tokens, KL over the trajectory tokens.
    Under data parallelism whose gradients are averaged over W ranks, pass the count over all ranks
    divided by W (it may then be fractional). A step with no valid token (count 0) gives 0, not NaN.

    token_losses_BT (B, T) per-token losses (any float dtype); mask_BT (B, T) bool.
    """
    mask_BT = _as_mask(mask_BT, tuple(token_losses_BT.shape))
    total = token_losses_BT.masked_fill(~mask_BT, 0.0).sum()
    if isinstance(n_step_tokens, Tensor):  # e.g. a count all-reduced over ranks: no host sync here
        return total / torch.where(n_step_tokens > 0, n_step_tokens, 1)
    if not n_step_tokens >= 0:
        raise ValueError(f"n_step_tokens must be >= 0, got {n_step_tokens!r}")
    return total / (n_step_tokens if n_step_tokens > 0 else 1)  # 0 tokens in the step: every sum is 0


# --- TALR and L2-SP (baselines) -------------------------------------------------------------------

TALR_MIN_WEIGHT = 0.01  # w_t is clamped from below: no token is ignored entirely
TALR_MIN_PROB = 1e-6  # p_t is clamped from below before the power: w_t stays finite for any tau


def talr_tau(ce_BT: Tensor, mask_BT: Tensor) -> float:
    """TALR's temperature when none is set: the median over sequences of each sequence's mean NLL
    (from a third-party reading of the paper, ../shared/paper/talr-summary.txt; the paper's own rule
    is not in the text). Sequences without a valid token are left out. ce_BT, mask_BT (B, T)."""
    mask_BT = _as_mask(mask_BT, tuple(ce_BT.shape))
    n_B = mask_BT.sum(dim=1)
    per_seq_B = ce_BT.detach().float().masked_fill(~mask_BT, 0.0).sum(dim=1) / n_B.clamp(min=1)
    per_seq_B = per_seq_B[n_B > 0]
    return float(per_seq_B.median()) if per_seq_B.numel() else 1.0


def talr_weights(ce_BT: Tensor, mask_BT: Tensor, tau: float) -> Tensor:
    """Token-adaptive loss reweighting: w_t = stop_gradient(clamp(p_t^(1/tau), min=0.01)), p_t the
    probability of the target token (exp(-CE_t), clamped at 1e-6). Tokens the model already finds
    likely keep their weight, unlikely ones (where SFT would move the model most) are damped.
    ce_BT, mask_BT (B, T) -> (B, T) weights, 0 where the mask is False. Multiply the per-token CE by
    them and reduce with ``reduce_step`` (sum / number of answer tokens)."""
    if not tau > 0:
        raise ValueError(f"TALR's tau must be > 0, got {tau}")
    mask_BT = _as_mask(mask_BT, tuple(ce_BT.shape))
    logp_BT = (-ce_BT.detach().float()).clamp(min=math.log(TALR_MIN_PROB))
    w_BT = torch.exp(logp_BT / tau).clamp(min=TALR_MIN_WEIGHT)
    return w_BT.masked_fill(~mask_BT, 0.0)


def l2sp_penalty(params: list[Tensor], anchors: list[Tensor]) -> Tensor:
    """L2-SP: ||W - W_0||^2 summed over the trained parameters (the caller multiplies by alpha).
    Its gradient is 2 (W - W_0), which the trainer adds to each parameter's gradient directly."""
    if len(params) != len(anchors):
        raise ValueError(f"{len(params)} parameters but {len(anchors)} anchors")
    total = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    for p, a in zip(params, anchors):
        total = total + (p.float() - a.float()).pow(2).sum()
    return total


# --- EMA loss balancing (Eq. 11-12) ----------------------------------------------------------------

class EMABalancer:
    """lambda_t = m_hat_CE / (m_hat_KL + eps), m_t = beta m_{t-1} + (1-beta) L_t, m_hat = m_t / (1 - beta^t). Detached.

    The step loss is L = L_CE + lambda_t * L_KL with lambda_t a constant for the gradient: it is a
    Python float computed from the step's detached losses. beta = 0.9 is the paper's; eps = 1e-8 is
    inferred (the paper does not give it). Both moving averages share beta and t, so the bias
    correction cancels in the ratio: it only changes how much eps weighs in the first steps.
    """

    def __init__(self, decay: float = 0.9, eps: float = 1e-8):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.decay = float(decay)
        self.eps = float(eps)
        self.step = 0
        self.m_ce = 0.0
        self.m_kl = 0.0

    def update(self, ce: float, kl: float) -> float:
        """Fold in one optimizer step's losses (detached; tensors are converted) and return lambda_t."""
        ce, kl = (float(x.detach()) if isinstance(x, Tensor) else float(x) for x in (ce, kl))
        if not (math.isfinite(ce) and math.isfinite(kl)):
            raise ValueError(f"losses must be finite (one NaN would poison every later lambda), got ce={ce}, kl={kl}")
        self.step += 1
        self.m_ce = self.decay * self.m_ce + (1.0 - self.decay) * ce
        self.m_kl = self.decay * self.m_kl + (1.0 - self.decay) * kl
        correction = 1.0 - self.decay**self.step
        return (self.m_ce / correction) / (self.m_kl / correction + self.eps)

    def state_dict(self) -> dict:
        """Plain numbers (JSON-serializable); `load_state_dict` resumes exactly."""
        return {"decay": self.decay, "eps": self.eps, "step": self.step, "m_ce": self.m_ce, "m_kl": self.m_kl}

    def load_state_dict(self, d: dict) -> None:
        if d["decay"] != self.decay or d["eps"] != self.eps:
            raise ValueError(f"saved balancer has decay={d['decay']}, eps={d['eps']}; "
                             f"this one has decay={self.decay}, eps={self.eps}")
        self.step, self.m_ce, self.m_kl = int(d["step"]), float(d["m_ce"]), float(d["m_kl"])


# --- the general-behaviour anchor (forgetting budget) ----------------------------------------------

def anchor_kl(student_logits_BTV: Tensor, original_logp_BTV: Tensor, mask_BT: Tensor) -> Tensor:
    """Per-token KL(p_original || p_student) over the full vocabulary: the anchor term of the forgetting
    budget, on the original model's own greedy answers to general prompts (``raftune.forgetting``).

    student_logits_BTV (B, T, V) with gradients; original_logp_BTV (B, T, V) the original model's
    log-probs (log_softmax of its logits, any values where the mask is False); mask_BT (B, T) bool.
    Its gradient is a cross-entropy against the original's soft labels: sum_v p_orig(v) (-log p_S(v))
    minus a constant. Returns (B, T) in fp32 (fp64 for fp64 inputs), 0 where the mask is False.
    """
    if student_logits_BTV.shape != original_logp_BTV.shape:
        raise ValueError(f"student logits {tuple(student_logits_BTV.shape)} and original log-probs "
                         f"{tuple(original_logp_BTV.shape)} differ in shape")
    mask_BT = _as_mask(mask_BT, tuple(student_logits_BTV.shape[:2]))
    logp_BTV = _upcast(original_logp_BTV).masked_fill(~mask_BT.unsqueeze(-1), 0.0)  # finite: no NaN in the gradient
    logq_BTV = torch.log_softmax(_upcast(student_logits_BTV), dim=-1)
    return _kl(logp_BTV, logq_BTV, "forward").masked_fill(~mask_BT, 0.0)


@torch.no_grad()
def chunked_log_probs(hidden_BTD: Tensor, lm_head: LMHead, chunk: int = 256) -> Tensor:
    """log_softmax(lm_head(hidden)) in fp32, computed ``chunk`` positions at a time, without gradients:
    the original model's side of ``anchor_kl``. Returns (B, T, V): call it on the answer positions only."""
    _, T = _check_hidden(hidden_BTD)
    return torch.cat([torch.log_softmax(_upcast(lm_head(hidden_BTD[:, s])), dim=-1) for s in _t_slices(T, chunk)], dim=1)


def chunked_anchor_kl(hidden_BTD: Tensor, lm_head: LMHead, original_logp_BTV: Tensor, mask_BT: Tensor,
                      chunk: int = 256) -> Tensor:
    """`anchor_kl(lm_head(hidden), original_logp, mask)` computed ``chunk`` positions at a time, each chunk
    checkpointed (the student's logits exist one chunk at a time in the forward and the backward).
    hidden_BTD (B, T, D) the student's; original_logp_BTV (B, T, V) from `chunked_log_probs`. Returns (B, T)."""
    _, T = _check_hidden(hidden_BTD, original_logp_BTV, mask_BT)

    def kl_chunk(h_BCD: Tensor, logp_BCV: Tensor, mask_BC: Tensor) -> Tensor:
        return anchor_kl(lm_head(h_BCD), logp_BCV, mask_BC)

    return torch.cat([_checkpointed(kl_chunk, hidden_BTD[:, s], original_logp_BTV[:, s], mask_BT[:, s])
                      for s in _t_slices(T, chunk)], dim=1)


# --- the forgetting budget's controller ------------------------------------------------------------

class BudgetController:
    """mu, the anchor's weight, kept by projected dual ascent on the constraint drift <= B, with a
    derivative term on the drift's rise.

    At each measurement of the monitored drift d (``raftune.forgetting``) from step ``warmup`` on:
    log mu <- log mu + rate * clip((d - B + derivative * max(d - d_prev, 0)) / B, -1, 1), then mu is
    projected onto [mu_min, mu_max]; d_prev is the measurement before (warm-up and step 0 included).
    Over budget mu grows, under it mu shrinks (domain learning gets room back), each measurement by
    at most a factor e^rate. In log space because the weight that holds a budget spans orders of
    magnitude across models, methods and budgets: multiplicative steps reach any of them in a few
    measurements and mu stays > 0. The relative error (d - B) / B makes the rate mean the same for
    every budget. The derivative term is the D of a PID Lagrangian (Stooke, Achiam and Abbeel 2020,
    "Responsive Safety in Reinforcement Learning by PID Lagrangian Methods"): a multiplier that only
    integrates the error lags a constraint that rises fast, and the drift overshoots before mu has
    grown (measured: RAFT, whose drift jumps in its first steps, docs/forgetting-budget/); on the rise
    only, so that over budget mu never falls. 0 is plain dual ascent. Before ``warmup`` (and at step 0,
    where d = 0 by construction) mu stays where it starts.
    """

    def __init__(self, budget: float, mu: float, rate: float, bounds: tuple[float, float], warmup: int = 0,
                 derivative: float = 1.0):
        lo, hi = (float(b) for b in bounds)
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"bounds must be 0 < mu_min <= mu_max < inf, got {bounds!r}")
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        if not (math.isfinite(derivative) and derivative >= 0):
            raise ValueError(f"derivative must be a finite number >= 0, got {derivative!r}")
        self.budget, self.rate, self.bounds, self.warmup = float(budget), float(rate), (lo, hi), int(warmup)
        self.derivative = float(derivative)
        self.mu = min(max(float(mu), lo), hi)
        self.updates = 0
        self.prev: float | None = None  # the drift measured before

    def update(self, drift: float, step: int) -> float:
        """Fold in the drift measured after ``step`` optimizer steps; returns mu for the steps that follow."""
        drift = float(drift)
        if not math.isfinite(drift):
            raise ValueError(f"drift must be finite, got {drift}")
        prev, self.prev = self.prev, drift
        if step < max(self.warmup, 1):
            return self.mu
        rise = max(drift - prev, 0.0) if prev is not None else 0.0
        error = min(max((drift - self.budget + self.derivative * rise) / self.budget, -1.0), 1.0)
        lo, hi = self.bounds
        self.mu = min(max(self.mu * math.exp(self.rate * error), lo), hi)
        self.updates += 1
        return self.mu

    def state_dict(self) -> dict:
        """Plain numbers (JSON-serializable); `load_state_dict` resumes exactly."""
        return {"budget": self.budget, "rate": self.rate, "bounds": list(self.bounds), "warmup": self.warmup,
                "derivative": self.derivative, "mu": self.mu, "updates": self.updates, "prev": self.prev}

    def load_state_dict(self, d: dict) -> None:
        mine = self.state_dict()
        settings = ("budget", "rate", "bounds", "warmup", "derivative")
        if any(d.get(k) != mine[k] for k in settings):
            raise ValueError("saved controller has " + ", ".join(f"{k}={d.get(k)}" for k in settings) + "; this one "
                             + ", ".join(f"{k}={mine[k]}" for k in settings))
        self.mu, self.updates, self.prev = float(d["mu"]), int(d["updates"]), d["prev"]
