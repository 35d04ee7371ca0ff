"""Stage 2 of RAFT: adaptive on-policy distillation, and the methods that are special cases of it.

    raftune train --data runs/refine-<hash>/fused.jsonl --method raft --lora
    accelerate launch -m raftune train --config train.yaml        # several GPUs (DDP)
    accelerate launch -m raftune train --config train.yaml --fsdp # several GPUs, weights sharded (FSDP2)

One training function serves every method; a method is a choice of loss terms, data and teacher
context (``METHODS``), not a subclass:

    raft      CE on the fused answers + lambda * top-K KL on the student's own trajectories, the
              teacher (frozen original model) given the fused answer as context (``chat`` for a
              model with a chat template, else Appendix H's plain text), lambda from
              bias-corrected EMAs of both losses (paper Eq. 11-12)
    sft       CE on the answers only
    onpolicy  CE + a fixed lambda (default 1.0) * KL to the teacher given only the prompt (the
              paper's on-policy baseline, Appendix B: no answer conditioning, fixed balancing)
    distill   KL only, the teacher given only the prompt: with ``teacher_model`` set to the
              original model and ``model`` to an SFT model, the second phase of SFT-then-distill
    talr      CE with token-adaptive loss reweighting (TALR): w_t = clamp(p_t^(1/tau), 0.01)
    l2sp      CE + alpha * ||W - W_0||^2 over the trained parameters (L2-SP)
    replay    CE on the answers with general instruction data (``replay_data``) mixed into every batch

Ablations are settings: ``kl_lambda`` (a fixed lambda), ``top_k: null`` (full-vocabulary KL),
``teacher_context`` (``appendix_h``, ``chat`` or ``none``), ``kl_direction`` (forward, reverse);
``replay_data`` and ``l2sp_alpha`` add replay or L2-SP to any method with a CE term.

A step, in the order of the method: batch; rollout (the student samples trajectories); student
forward on prompt + fused answer (CE); student forward on prompt + trajectory and teacher forward on
context + trajectory under no_grad (KL); with a forgetting budget or ``anchor_weight``, the anchor
(KL to the original model on its own answers to general prompts); lambda; optimizer step; log, with
the forgetting monitor's drift every ``monitor_every`` steps (``raftune.forgetting.Forgetting``).
Losses follow one rule: sum over valid tokens, divided by the number of valid tokens of the whole
optimizer step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from raftune import forgetting, losses, outputs
from raftune.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from raftune.data import QAExample, load_qa
from raftune.distributed import (
    gathered,
    grad_norm_value,
    load_trainable_state,
    shard,
    trainable_state,
)
from raftune.files import append_jsonl, atomic_write_json, stable_hash
from raftune.generation.engine import CompileMode, compile_fallback_of
from raftune.models import context_length, eval_mode
from raftune.rollout import RolloutConfig, sample_trajectories
from raftune.sequences import (
    TEACHER_CONTEXTS,
    answer_batch,
    chat_prompt_ids,
    end_of_turn_id,
    special_token_hits,
    teacher_context_ids,
    trajectory_batch,
    warn_special_text,
)
from raftune.settings import (
    Device,
    Dtype,
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    settings,
)

log = logging.getLogger("raftune.train")


@dataclass(frozen=True)
class Method:
    ce: bool
    kl: bool
    teacher_context: str = "auto"  # auto: chat where the tokenizer has a chat template, else appendix_h
    kl_lambda: float | None = None  # a fixed lambda; None: EMA-balanced (with both terms)
    talr: bool = False  # CE reweighted per token (TALR)
    l2sp_alpha: float = 0.0  # alpha of the L2-SP penalty
    replay: bool = False  # needs replay_data


MethodName = Literal["raft", "sft", "onpolicy", "distill", "talr", "l2sp", "replay"]
L2SP_ALPHA = 0.01  # chosen, not from a paper: the L2-SP method's alpha when l2sp_alpha is not set
MONITOR_EVERY, MONITOR_EVERY_BUDGET = 50, 10  # measured: README "Forgetting monitor and budget" (cost)

METHODS = {
    "raft": Method(ce=True, kl=True),
    "sft": Method(ce=True, kl=False),
    "onpolicy": Method(ce=True, kl=True, teacher_context="none", kl_lambda=1.0),
    "distill": Method(ce=False, kl=True, teacher_context="none"),
    "talr": Method(ce=True, kl=False, talr=True),
    "l2sp": Method(ce=True, kl=False, l2sp_alpha=L2SP_ALPHA),
    "replay": Method(ce=True, kl=False, replay=True),
}
assert set(METHODS) == set(MethodName.__args__)


@settings
class TrainConfig:
    data: str = field(metadata={"help": "training data: a fused.jsonl from `raftune refine`, or any QA source"})
    method: MethodName = field(default="raft", metadata={"help": f"one of {sorted(METHODS)}"})
    model: str = "default"
    out_dir: str = "runs"
    answer_field: str = field(default="answer", metadata={"help": "CE targets (fused.jsonl: answer = fused, original_answer = original)"})
    reference_field: str | None = field(default=None, metadata={"help": "teacher's reference answer; default: answer_field"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out QA data for the domain loss (e.g. heldout.jsonl)"})
    eval_limit: Positive | None = 64
    eval_every: NonNegative = 0  # steps; 0: only before and after training
    # --- optimisation (paper 4.1: AdamW, weight decay 0.01, 3 epochs, batch 16, bf16)
    epochs: PositiveFloat = 3.0
    max_steps: Positive | None = field(default=None, metadata={"help": "optimizer steps; null: epochs"})
    batch_size: Positive = 16
    grad_accum: Positive = 1
    lr: PositiveFloat | None = field(default=None, metadata={"help": "default 1e-5 full fine-tuning (inferred), 2e-4 LoRA"})
    weight_decay: NonNegativeFloat = 0.01
    warmup_ratio: Fraction = 0.05
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: PositiveFloat = 1.0
    seed: int = 0
    max_len: Positive = 1024
    # --- LoRA (peft)
    lora: bool = False
    lora_r: Positive = 16
    lora_alpha: Positive = 32
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    lora_targets: str = "all-linear"
    merge_lora: bool = True
    # --- rollouts and distillation
    rollout_max_new_tokens: Positive = 128
    rollout_temperature: NonNegativeFloat = 1.0
    rollout_top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    rollout_compile: CompileMode = field(default="auto", metadata={
        "help": "rollout decoding: auto (CUDA graphs on CUDA, eager elsewhere), off, or a torch.compile mode"})
    top_k: Positive | None = field(default=512, metadata={"help": "teacher's top-K (paper: 512); null: full vocabulary"})
    kl_temperature: PositiveFloat = field(default=1.0, metadata={"help": "T (inferred default 1.0)"})
    kl_direction: Literal["forward", "reverse"] = "forward"
    kl_lambda: NonNegativeFloat | None = field(default=None, metadata={
        "help": "fixed lambda; null: the method's (raft: EMA-balanced; onpolicy: 1.0)"})
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.9
    ema_eps: PositiveFloat = field(default=1e-8, metadata={"help": "inferred"})
    teacher_context: Literal["appendix_h", "chat", "none"] | None = field(default=None, metadata={
        "help": f"{TEACHER_CONTEXTS}; default: the method's (raft: chat for a model with a chat template, else appendix_h)"})
    teacher_model: str | None = field(default=None, metadata={
        "help": "the frozen teacher of the KL term; default: the model the run starts from"})
    # --- baselines
    talr_tau: PositiveFloat | None = field(default=None, metadata={
        "help": "TALR's tau; null: each step, the median over sequences of their mean NLL (a third-party reading)"})
    l2sp_alpha: NonNegativeFloat | None = field(default=None, metadata={"help": f"L2-SP's alpha; null: the method's (l2sp: {L2SP_ALPHA}, others 0)"})
    replay_data: str | None = field(default=None, metadata={"help": "general instruction data mixed into every CE batch"})
    replay_ratio: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = field(default=0.2, metadata={"help": "share of each CE batch taken from replay_data (chosen default)"})
    max_reference_tokens: Positive = 1024
    loss_chunk: Positive = field(default=64, metadata={"help": "sequence positions per chunk of the LM head and losses"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each decoder layer's activations in the backward: about half the memory, a few % more time (RAFT)"})
    teacher_device: Device = None
    teacher_dtype: Dtype = None
    fsdp: bool = field(default=False, metadata={"help": "shard student and teacher over the processes (FSDP2) instead of DDP"})
    # --- forgetting monitor and budget (raftune.forgetting; README "Forgetting monitor and budget")
    monitor_data: str | None = field(default=None, metadata={
        "help": "general prompts whose drift KL(original || student) is measured while training (any file the eval "
                "suites' general_data reads); null: raftune's built-in set"})
    monitor_limit: Positive | None = field(default=32, metadata={"help": "prompts read from monitor_data, and from anchor_data"})
    monitor_every: NonNegative | None = field(default=None, metadata={
        "help": f"steps between drift measurements (also before the first and after the last step); 0: off; "
                f"null: {MONITOR_EVERY}, or {MONITOR_EVERY_BUDGET} with a forgetting_budget"})
    monitor_max_new_tokens: Positive = field(default=128, metadata={
        "help": "length of the original model's greedy answers to the monitor and anchor prompts"})
    forgetting_budget: PositiveFloat | None = field(default=None, metadata={
        "help": "drift KL per token to stay within: a controller adapts the anchor's weight to it, and model/ is the "
                "measured point with the best held-out domain loss within it; null: off"})
    anchor_data: str | None = field(default=None, metadata={
        "help": "general prompts of the anchor, KL(original || student) on the original's answers (disjoint from "
                "monitor_data); null: the built-in anchor set"})
    anchor_weight: NonNegativeFloat | None = field(default=None, metadata={
        "help": "mu, the anchor's weight: fixed without a budget (null or 0: no anchor); with one, where the "
                "controller starts (null: 1)"})
    anchor_batch: Positive = field(default=4, metadata={"help": "anchor prompts per step and process (a seeded cycle)"})
    budget_warmup: NonNegative = field(default=0, metadata={"help": "steps before the controller first adapts mu"})
    budget_rate: PositiveFloat = field(default=1.0, metadata={
        "help": "eta: log mu += eta * clip((drift - budget + k_d * rise) / budget, -1, 1) at each measurement"})
    budget_derivative: NonNegativeFloat = field(default=1.0, metadata={
        "help": "k_d: the weight of the drift's rise since the last measurement in the controller's error (0: plain "
                "dual ascent)"})
    anchor_weight_bounds: tuple[PositiveFloat, PositiveFloat] = field(default=(0.01, 100.0), metadata={
        "help": "[mu_min, mu_max]: the controller's range for mu"})
    # --- bookkeeping
    save_every: Positive = 50
    keep_checkpoints: Positive = 2
    max_bad_steps: Positive = 5
    tensorboard: bool = False
    device: Device = None
    dtype: Dtype = field(default=None, metadata={"help": "master weights' dtype; default fp32"})
    mixed_precision: Literal["auto", "bf16", "no"] = field(default="auto", metadata={
        "help": "auto (bf16 autocast on CUDA, none elsewhere), bf16 (also on CPU), or no"})
    name: str | None = None

    def __post_init__(self):
        checks = [  # across settings; each setting's own type and range are checked by the annotations
            (not (self.fsdp and self.teacher_device), "fsdp shards the teacher with the student: drop teacher_device"),
            (not METHODS[self.method].replay or self.replay_data,
             "method replay needs replay_data (general instruction data, e.g. ../shared/data/alpaca_tiny/alpaca_tiny.json)"),
            (not self.replay_data or METHODS[self.method].ce, "replay_data needs a method with a CE term"),
            (self.forgetting_budget is None or self.monitor_interval > 0,
             "forgetting_budget needs the monitor (monitor_every > 0): the controller acts on its measurements"),
            (self.anchor_weight_bounds[0] <= self.anchor_weight_bounds[1], "anchor_weight_bounds: mu_min > mu_max"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def spec(self) -> Method:
        """The method with this config's overrides; ``teacher_context`` may still be ``auto`` (see ``resolve``)."""
        m = METHODS[self.method]
        return dataclasses.replace(
            m, teacher_context=self.teacher_context or m.teacher_context,
            kl_lambda=self.kl_lambda if self.kl_lambda is not None else m.kl_lambda,
            l2sp_alpha=self.l2sp_alpha if self.l2sp_alpha is not None else m.l2sp_alpha,
            replay=m.replay or self.replay_data is not None)

    def resolve(self, tok) -> Method:
        """``spec`` with ``auto`` settled for this tokenizer: the chat-formatted teacher context where it
        has a chat template. On a chat model Appendix H's plain-text context makes the teacher predict
        the end of the turn at once, and RAFT's answers empty (175 of 200 held-out answers on
        SmolLM2-135M-Instruct, docs/results.md)."""
        spec = self.spec
        if spec.teacher_context == "auto":
            spec = dataclasses.replace(spec, teacher_context="chat" if getattr(tok, "chat_template", None) else "appendix_h")
        return spec

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 1e-5)

    def bf16(self, device_type: str) -> bool:
        """Whether the forwards run under bf16 autocast on ``device_type``: ``mixed_precision`` resolved."""
        return self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and device_type == "cuda")

    @property
    def monitor_interval(self) -> int:
        """Steps between drift measurements (0: no monitor), ``monitor_every`` resolved."""
        if self.monitor_every is not None:
            return self.monitor_every
        return MONITOR_EVERY_BUDGET if self.forgetting_budget is not None else MONITOR_EVERY

    @property
    def anchored(self) -> bool:
        """Whether the loss has the anchor term: a budget, or a fixed ``anchor_weight`` > 0."""
        return self.forgetting_budget is not None or bool(self.anchor_weight)


# --- model set-up -----------------------------------------------------------------------------------


def build_models(cfg: TrainConfig, device: torch.device):
    """(student, teacher, tokenizer), both models wrapped in ``TokenLosses``. The teacher is the frozen
    original model: with LoRA and no other ``teacher_model``, None, because it is the student's
    weights with the adapters switched off (no second copy); otherwise a frozen copy, or
    ``teacher_model`` loaded apart (it must share the student's vocabulary). A method without a KL
    term gets the frozen copy too when the forgetting monitor or anchor is on (they compare the student
    with the original) and there is no LoRA."""
    from raftune.models import load_model_and_tokenizer, pick_device, pick_dtype

    # fp32 master weights; on CUDA the forward runs under bf16 autocast (accelerate's mixed precision)
    model, tok = load_model_and_tokenizer(cfg.model, device=str(device), dtype=cfg.dtype or "fp32")
    model.config.use_cache = False
    teacher = None
    other_teacher = cfg.spec.kl and cfg.teacher_model not in (None, cfg.model)
    # the monitor and the anchor need the original model: without LoRA or a teacher, a frozen copy
    if other_teacher or not cfg.lora and (cfg.spec.kl or cfg.monitor_interval or cfg.anchored):
        tdev = pick_device(cfg.teacher_device or str(device))
        if other_teacher:
            t_model, t_tok = load_model_and_tokenizer(cfg.teacher_model, device=str(tdev), dtype=cfg.teacher_dtype)
            if len(t_tok) != len(tok) or t_tok.get_vocab() != tok.get_vocab():
                raise ValueError(f"teacher_model {cfg.teacher_model!r} has another vocabulary than {cfg.model!r}: "
                                 "the KL compares their distributions token by token")
        else:
            # the monitor's own copy keeps the student's dtype: its drift at step 0 is then exactly 0
            t_model = copy.deepcopy(model).to(tdev, pick_dtype(tdev, cfg.teacher_dtype) if cfg.spec.kl or cfg.teacher_dtype
                                              else model.dtype)
        t_model.config.use_cache = False
        teacher = TokenLosses(t_model.eval().requires_grad_(False))
    if cfg.gradient_checkpointing:  # only training-mode forwards recompute: rollouts (eval mode) keep their KV cache
        # non-reentrant: works with frozen embeddings (LoRA), with FSDP2 and with DDP's gradient hooks
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.24 on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    student = TokenLosses(_with_lora(cfg, model))
    student.train()  # from_pretrained returns eval mode: dropout and checkpointing act in training mode only
    return student, teacher, tok


def _with_lora(cfg: TrainConfig, model):
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=cfg.lora_targets, task_type="CAUSAL_LM"))


class TokenLosses(torch.nn.Module):
    """The causal LM with its chunked loss heads. One ``forward`` runs the backbone and the LM head, so
    a replicated (DDP) model sees each use of its weights inside its own forward, and the LM head is
    only ever applied to chunks of the sequence (its full-vocabulary logits never exist for the batch).

    what="ce": per-token CE (B, T); "kl": per-token top-K KL on the positions ``pos`` (B, L);
    "topk": the teacher's top-K log-probs and indices at ``pos`` ((B, L, K), (B, L, K));
    "hidden": the final hidden states (B, T, D); "logprobs": full log-probs at ``pos`` (B, L, V);
    "anchor": per-token full-vocabulary KL(original || student) at ``pos`` (B, L);
    "rollout": ``sample_trajectories`` of the model. Rollouts go through this forward too, so that a
    sharded (FSDP) or replicated (DDP) model runs them through its own hooks.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, what, *args, **kw):
        if what == "rollout":
            return sample_trajectories(self.lm, *args, **kw)
        return self._losses(what, *args, **kw)

    def _losses(self, what, ids, attn, pos=None, labels=None, mask=None, t_logp=None, t_idx=None, *,
                chunk: int, k: int | None = None, temperature: float = 1.0, direction: str = "forward"):
        # only the last position's logits from the model itself: the full LM head is skipped
        h = self.lm(input_ids=ids, attention_mask=attn, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        head = self.lm.get_output_embeddings()
        if pos is not None:
            h = h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, L, D)
        if what == "hidden":  # the forgetting monitor applies the head itself, a chunk at a time
            return h
        if what == "logprobs":  # the original's side of the anchor
            return losses.chunked_log_probs(h, head, chunk)
        if what == "anchor":
            return losses.chunked_anchor_kl(h, head, t_logp, mask, chunk)
        if what == "ce":
            return losses.chunked_token_ce(h, head, labels, mask, chunk)
        if what == "kl":
            return losses.chunked_topk_kl(h, head, t_logp, t_idx, mask, temperature, direction, chunk)
        if what == "topk":
            return losses.chunked_teacher_topk(h, head, k or head.weight.shape[0], temperature, chunk)
        raise ValueError(what)


@torch.no_grad()
def domain_loss(model, tok, examples: list[QAExample], batch_size: int, max_len: int, eot: int, chunk: int = 64) -> float:
    """Mean cross-entropy per answer token of ``examples`` (the held-out domain loss)."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    with eval_mode(model):
        for s in range(0, len(examples), batch_size):
            batch = examples[s : s + batch_size]
            prompts = [chat_prompt_ids(tok, ex.question, ex.system) for ex in batch]
            ids, attn, labels, lmask, _ = answer_batch(tok, prompts, [ex.answer for ex in batch], eot, max_len, tok.pad_token_id)
            ce = model("ce", ids.to(device), attn.to(device), labels=labels.to(device), mask=lmask.to(device), chunk=chunk)
            total += float(ce.sum())
            n += int(lmask.sum())
    return total / max(n, 1)


# --- the training function --------------------------------------------------------------------------


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train ``cfg`` and return its run folder; the same call resumes it from its last checkpoint."""
    with contextlib.ExitStack() as hold:  # the run folder's lock, held until the run ends
        return _train(cfg, progress, hold)


def _train(cfg: TrainConfig, progress: bool, hold: contextlib.ExitStack) -> Path:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import get_scheduler

    from raftune.models import pick_device

    device_type = pick_device(cfg.device).type
    bf16 = cfg.bf16(device_type)
    # accelerate keeps one mixed-precision state per process; a second run in the process (`raftune run`
    # trains several methods) may want another one. The distributed state (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(cpu=device_type == "cpu", mixed_precision="bf16" if bf16 else "no")
    torch.manual_seed(cfg.seed)
    fsdp = (cfg.fsdp or acc.distributed_type == DistributedType.FSDP) and acc.num_processes > 1
    if cfg.fsdp and not fsdp:
        log.warning("fsdp asked for with a single process: nothing to shard over; training unsharded")
    log.info("%s on %s, %s", cfg.method, acc.device, "1 process" if acc.num_processes == 1 else f"{acc.num_processes} processes, "
             f"{'FSDP' if fsdp else 'DDP' if acc.distributed_type.value.startswith('MULTI') else acc.distributed_type.value}")

    # --- data
    ref_field = cfg.reference_field or cfg.answer_field
    train_set, report = load_qa(cfg.data, answer_field=cfg.answer_field)
    # the teacher's references by row ("path:line"): a sample's key hashes its answer, which differs between the fields
    refs = {ex.source: ex.answer for ex in load_qa(cfg.data, answer_field=ref_field)[0]} if ref_field != cfg.answer_field else None
    eval_set = load_qa(cfg.eval_data, limit=cfg.eval_limit)[0] if cfg.eval_data else []
    replay_set = _seeded_order(load_qa(cfg.replay_data)[0], cfg.seed) if cfg.replay_data else []
    execution = ("out_dir", "tensorboard", "name", "device", "save_every", "keep_checkpoints", "eval_every", "max_bad_steps", "fsdp",
                 "gradient_checkpointing")
    # what the run computes: its settings and the content of the models and data it reads (a model
    # replaced at the same path is another run, never the resumption of this one)
    # the batch counted over all processes: a run stopped under FSDP on 2 processes at batch 2 resumes on 1 at batch 4
    # a setting that changes nothing without a budget, and came after runs of the others: in their key only with one
    budget_only = () if cfg.forgetting_budget is not None else ("budget_derivative",)
    made_of = {"settings": {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in execution + budget_only},
                            "batch_size": cfg.batch_size * acc.num_processes},
               "models": [outputs.model_fingerprint(m) for m in (cfg.model, cfg.teacher_model)],
               "data": [outputs.data_fingerprint(d) for d in (cfg.data, cfg.eval_data, cfg.replay_data,
                                                              *forgetting.prompt_sources(cfg).values())]}
    ident = stable_hash(made_of, 10)
    run = Path(cfg.out_dir) / (cfg.name or f"train-{cfg.method}-{ident}")
    what = f"method {cfg.method}, lr {cfg.learning_rate:g}, model {cfg.model}, data {cfg.data}"
    if acc.is_main_process:  # one process writes the run folder, and one run at a time
        outputs.claim(run, "train", ident, other_key="refuse", what=what, made_of=made_of,
                      hint="give another name (or out_dir) for a run of these settings")
        hold.enter_context(outputs.locked(run, f"training {cfg.method}"))
    acc.wait_for_everyone()
    atomic_write_json(run / "config.json", {**dataclasses.asdict(cfg), "learning_rate": cfg.learning_rate,
                                            "data_report": dataclasses.asdict(report)})

    # --- models, optimizer, schedule
    # FSDP: load on the CPU, and sharding puts each process's shard on its device
    model, teacher, tok = build_models(cfg, torch.device("cpu") if fsdp else acc.device)
    spec = cfg.resolve(tok)
    # --- length guard: a prompt that leaves no room for an answer (or a rollout) is skipped and counted
    train_set, too_long = _fitting(train_set, tok, cfg, spec, model.lm)
    eval_set, eval_too_long = _fitting(eval_set, tok, cfg, spec, model.lm)
    if too_long or eval_too_long:
        log.warning("skipped %d training and %d held-out samples whose prompt leaves no room for an answer within max_len=%d"
                    "%s", too_long, eval_too_long, cfg.max_len, " or the model's context" if spec.kl else "")
    if not train_set:
        raise ValueError(f"{cfg.data}: every sample's prompt is longer than max_len={cfg.max_len} tokens")
    # the data's special-token strings are tokenized as text (sequences.py); the rows holding them are counted
    special = {name: special_token_hits(tok, [(ex.question, ex.system, ex.answer, refs.get(ex.source) if refs else None)
                                              for ex in exs])
               for name, exs in (("train", train_set), ("eval", eval_set), ("replay", replay_set))}
    warn_special_text(log, "train", sum(special.values()), len(train_set) + len(eval_set) + len(replay_set))
    atomic_write_json(run / "config.json", {**json.loads((run / "config.json").read_text()), "resolved": dataclasses.asdict(spec),
                                            "skipped_too_long": {"train": too_long, "eval": eval_too_long},
                                            "rows_with_special_token_text": special})
    if fsdp:
        shard(model, acc.device.type, mixed_precision=bf16)
        if teacher is not None:
            shard(teacher, acc.device.type, mixed_precision=bf16)
    eot = end_of_turn_id(tok, model.lm.generation_config)
    eos_ids = {eot, tok.eos_token_id}
    micro_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * acc.num_processes))
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if spec.l2sp_alpha else None  # W_0 of L2-SP, before any resume
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if not fsdp:  # DDP wrapping (nothing on one process); a sharded model is already distributed
        model, optimizer = acc.prepare(model, optimizer)
    balancer = losses.EMABalancer(cfg.ema_decay, cfg.ema_eps)
    # the monitor, anchor and budget; the original model's answers are made here once per run
    watch = forgetting.Forgetting(cfg, run, tok, eot, acc, model, teacher)
    state = {"step": 0, "micro": 0, "bad_in_a_row": 0, "truncated_references": 0, "truncated_answers": 0}

    # --- resume
    if ckpts := list_checkpoints(run):
        saved = load_checkpoint(run / f"checkpoint-{ckpts[-1]}", acc.unwrap_model(model), optimizer, scheduler, key=ident)
        balancer.load_state_dict(saved.pop("balancer"))
        watch.load_state_dict(saved.pop("forgetting"))
        state.update({k: v for k, v in saved.items() if k in state})
        log.info("resumed from %s at step %d", run / f"checkpoint-{ckpts[-1]}", state["step"])

    def checkpoint():
        if fsdp or acc.is_main_process:  # under FSDP the weights are gathered by every process
            save_checkpoint(run, state["step"], acc.unwrap_model(model), optimizer, scheduler,
                            {**state, "balancer": balancer.state_dict(), "forgetting": watch.state_dict(), "run_key": ident}, cfg.keep_checkpoints,
                            write=acc.is_main_process)

    stop = {"signal": None}

    def on_sigterm(signum, frame):  # finish the step, save, exit
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    writer = _tensorboard(run) if cfg.tensorboard and acc.is_main_process else None

    def held_out_loss() -> float | None:  # a sharded model's forward needs every process
        if fsdp or acc.is_main_process:
            return domain_loss(model, tok, eval_set, cfg.batch_size, cfg.max_len, eot, cfg.loss_chunk)
        return None

    if state["step"] == 0:  # the model it starts from: its held-out loss, and its drift (0) from the original
        start = {"eval_domain_loss": held_out_loss()} if eval_set else {}
        if (start := {**start, **watch.after_step(0, start.get("eval_domain_loss"))}) and acc.is_main_process:
            _log(run, writer, {"step": 0, **start})

    def micro_batches():
        """Every micro-batch of the run in order, from a seeded permutation per epoch; skips what is done."""
        i = 0
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(cfg.seed + epoch)
            order = torch.randperm(len(train_set), generator=g).tolist()
            for s in range(0, micro_per_epoch * cfg.batch_size * acc.num_processes, cfg.batch_size * acc.num_processes):
                rows = order[s : s + cfg.batch_size * acc.num_processes]
                if len(rows) < acc.num_processes:  # every process must take part in every step: wrap around
                    rows += order[: acc.num_processes - len(rows)]
                chunk = rows[acc.process_index :: acc.num_processes]
                if i >= state["micro"] and chunk:
                    yield epoch, [train_set[j] for j in chunk]
                i += 1
            epoch += 1

    batches = micro_batches()
    rollout_cfg = RolloutConfig(cfg.rollout_max_new_tokens, cfg.rollout_temperature, cfg.rollout_top_p, cfg.rollout_compile)
    fallback = None  # why the rollouts' compiled decoding failed, once recorded
    columns = [TextColumn(f"train {cfg.method}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not (progress and acc.is_main_process)) as bar:
        task = bar.add_task("train", total=total_steps, completed=state["step"], info="")
        while state["step"] < total_steps and not _agreed_stop(acc, stop["signal"]):
            t_step = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            epoch = micro[-1][0]
            # --- rollouts for every micro-batch of the step (the student as it is before the update)
            t0 = time.perf_counter()
            prompts = [[chat_prompt_ids(tok, ex.question, ex.system) for ex in b] for _, b in micro]
            with gathered(model), torch.no_grad():  # no_grad outside too: DDP then prepares no reduction
                rollouts = [model("rollout", p, rollout_cfg, tok.pad_token_id, eos_ids, batch_bucket=cfg.batch_size)
                            if spec.kl else None for p in prompts]
            t_rollout = time.perf_counter() - t0
            ce_inputs = []
            for m, (p, (_, b)) in enumerate(zip(prompts, micro)):
                if not spec.ce:
                    ce_inputs.append(None)
                    continue
                extra = _replay_examples(replay_set, cfg, state["micro"] + m, len(b)) if spec.replay else []
                ce_inputs.append(answer_batch(tok, p + [chat_prompt_ids(tok, ex.question, ex.system) for ex in extra],
                                              [ex.answer for ex in [*b, *extra]], eot, cfg.max_len, tok.pad_token_id))
            n_ce = sum(int(c[3].sum()) for c in ce_inputs) if spec.ce else 0
            n_kl = sum(int(r[1].sum()) for r in rollouts) if spec.kl else 0
            # the step's token counts over all processes, divided by their number: DDP averages the
            # gradients of the processes, which brings the division back to the global count
            n_ce, n_kl = _global(acc, n_ce) / acc.num_processes, _global(acc, n_kl) / acc.num_processes
            ce_sum, kl_sum, tokens = 0.0, 0.0, 0
            kl_grads = None  # with EMA lambda, CE and KL gradients are kept apart until lambda is known
            split = spec.ce and spec.kl and spec.kl_lambda is None
            talr_taus = []
            # Each loss term is backpropagated right after its own forward: DDP allows one backward per forward.
            for (_, batch), p, ro, ce_in in zip(micro, prompts, rollouts, ce_inputs):
                # --- student forward on prompt + answer: CE
                if spec.ce:
                    ids, attn, labels, lmask, cut = ce_in
                    state["truncated_answers"] += cut
                    lmask = lmask.to(acc.device)
                    with acc.autocast():
                        ce_tok = model("ce", ids.to(acc.device), attn.to(acc.device), labels=labels.to(acc.device),
                                       mask=lmask, chunk=cfg.loss_chunk)
                        if spec.talr:  # per micro-batch: tau from the sequences at hand
                            talr_taus.append(cfg.talr_tau or losses.talr_tau(ce_tok, lmask))
                            ce_tok = ce_tok * losses.talr_weights(ce_tok, lmask, talr_taus[-1])
                        ce_loss = losses.reduce_step(ce_tok, lmask, n_ce)
                    acc.backward(ce_loss)
                    ce_sum += float(ce_loss.detach())
                    tokens += int(attn.sum())
                # --- student and teacher forwards on the trajectory: top-K KL
                if spec.kl:
                    traj, tmask = ro
                    with acc.autocast():
                        kl_loss, n_tok = _kl_loss(cfg, spec, model, teacher, tok, batch, p, traj, tmask, refs, state, acc, n_kl)
                    if split:  # into its own accumulator until lambda is known
                        kl_grads = _swap_grads(params, kl_grads)
                        acc.backward(kl_loss)
                        kl_grads = _swap_grads(params, kl_grads)
                    else:
                        acc.backward(kl_loss * (spec.kl_lambda if spec.ce else 1.0))
                    kl_sum += float(kl_loss.detach())
                    tokens += n_tok
            anchor = watch.anchor_backward(state["step"])  # (KL, mu): the general-behaviour anchor, or None
            ce_step, kl_step = _global(acc, ce_sum, mean=True), _global(acc, kl_sum, mean=True)

            # --- lambda, then one optimizer step
            if split:
                lam = balancer.update(ce_step, kl_step) if math.isfinite(ce_step + kl_step) else float("nan")
                for prm, g in zip(params, kl_grads):  # gradient of CE + lambda * KL
                    if g is not None:
                        prm.grad = g.mul_(lam) if prm.grad is None else prm.grad.add_(g, alpha=lam)
            elif spec.ce and spec.kl:
                lam = spec.kl_lambda
            else:
                lam = None
            l2sp = None
            if anchors is not None:  # its gradient 2 alpha (W - W_0) added directly: no backward, no collective
                with torch.no_grad():
                    l2sp = spec.l2sp_alpha * float(losses.l2sp_penalty(params, anchors))
                    for prm, w0 in zip(params, anchors):
                        delta = (prm.detach() - w0).mul_(2 * spec.l2sp_alpha)
                        prm.grad = delta if prm.grad is None else prm.grad.add_(delta)
            loss_value = (ce_step if spec.ce else 0.0) + ((lam or 1.0) * kl_step if spec.kl else 0.0) + (l2sp or 0.0) \
                + (anchor[0] * anchor[1] if anchor else 0.0)
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                state["bad_in_a_row"] += 1
                log.warning("step %d: loss is %s; step skipped (%d in a row)", state["step"] + 1, loss_value, state["bad_in_a_row"])
                if state["bad_in_a_row"] >= cfg.max_bad_steps:
                    raise FloatingPointError(f"{cfg.max_bad_steps} non-finite losses in a row; stopping (last checkpoint kept)")
                state["micro"] += cfg.grad_accum
                continue
            state["bad_in_a_row"] = 0
            grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))  # DTensors under FSDP
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["micro"] += cfg.grad_accum

            # --- log
            dt = time.perf_counter() - t_step
            row = {"step": state["step"], "epoch": epoch, "lr": scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 6),
                   "tokens_per_s": round(_global(acc, tokens) / dt, 1), "rollout_s": round(t_rollout, 3),
                   "other_s": round(dt - t_rollout, 3), "truncated_references": state["truncated_references"]}
            if spec.ce:
                row["ce"] = ce_step
            if spec.kl:
                row["kl"] = kl_step
                row["rollout_tokens"] = n_kl
            if talr_taus:
                row["talr_tau"] = sum(talr_taus) / len(talr_taus)
            if l2sp is not None:
                row["l2sp"] = l2sp
            if lam is not None:
                row["lambda"] = lam
                row["ce_over_lambda_kl"] = ce_step / (lam * kl_step) if lam * kl_step > 0 else None
            if anchor:
                row["anchor_kl"], row["anchor_weight"] = anchor
            last = state["step"] == total_steps  # the monitor measures after the last step too
            if eval_set and (cfg.eval_every and state["step"] % cfg.eval_every == 0 or watch.wants_eval(state["step"], last)):
                row["eval_domain_loss"] = held_out_loss()
            row.update(watch.after_step(state["step"], row.get("eval_domain_loss"), last))  # drift, controller, budget
            if spec.kl and (why := compile_fallback_of(acc.unwrap_model(model).lm)) and why != fallback:
                fallback = row["rollout_compile_fallback"] = why  # the first step that decoded eagerly
                if acc.is_main_process:  # beside the settings: this run's rollouts are not compiled
                    atomic_write_json(run / "config.json", {**json.loads((run / "config.json").read_text()),
                                                            "rollout_compile_fallback": why})
            if acc.is_main_process:
                _log(run, writer, row)
            bar.update(task, advance=1, info=" ".join(f"{k} {v:.3g}" for k, v in (*((k, row.get(k)) for k in ("ce", "kl", "lambda")),
                                                                              ("drift", watch.last)) if v is not None))
            if state["step"] % cfg.save_every == 0:
                checkpoint()

    signal.signal(signal.SIGTERM, old_handler)
    if state["step"] < total_steps:  # stopped by SIGTERM (on any process)
        checkpoint()
        log.info("SIGTERM: checkpoint saved at step %d in %s; run the same command to resume", state["step"], run)
        raise SystemExit(143)

    # --- evaluate, save the model, plot
    if eval_set and (loss := held_out_loss()) is not None and acc.is_main_process:
        _log(run, writer, {"step": state["step"], "eval_domain_loss": loss})
    if state["truncated_references"]:
        log.warning("%d teacher references were longer than max_reference_tokens=%d and were cut",
                    state["truncated_references"], cfg.max_reference_tokens)
    checkpoint()
    final = _unsharded(cfg, model, acc) if fsdp else acc.unwrap_model(model)
    if acc.is_main_process:
        watch.choose(final)  # with a budget: the best point within it (config.json says which and why)
        _save_final(final.lm, tok, run / "model", cfg)
        from raftune.plots import plot_training

        plot_training(run / "metrics.jsonl", run, budget=cfg.forgetting_budget)
        outputs.mark_complete(run)
    acc.wait_for_everyone()
    return run


# --- pieces of a step -------------------------------------------------------------------------------


def _kl_loss(cfg, spec, model, teacher, tok, batch, prompts, traj, tmask, refs, state, acc, n_kl):
    """Top-K KL between the teacher and the student on the student's trajectories (reduced for the step)."""
    contexts = []
    for ex, p in zip(batch, prompts):
        ref = refs.get(ex.source, ex.answer) if refs is not None and spec.teacher_context != "none" else ex.answer
        ctx = teacher_context_ids(tok, spec.teacher_context, ex.question, ref, p, cfg.max_reference_tokens, ex.system)
        state["truncated_references"] += ctx.reference_truncated
        contexts.append(ctx.ids)
    s_ids, s_attn, s_pos = trajectory_batch(prompts, traj, tmask, tok.pad_token_id)
    t_ids, t_attn, t_pos = trajectory_batch(contexts, traj, tmask, tok.pad_token_id)
    mask = tmask.to(acc.device)
    topk = dict(chunk=cfg.loss_chunk, k=cfg.top_k, temperature=cfg.kl_temperature)
    with torch.no_grad():
        if teacher is None:  # LoRA: the base weights with the adapters off are the original model
            with acc.unwrap_model(model).lm.disable_adapter(), eval_mode(model):  # no dropout in the teacher
                t_logp, t_idx = model("topk", t_ids.to(acc.device), t_attn.to(acc.device), pos=t_pos.to(acc.device), **topk)
        else:  # a frozen copy, possibly on another device or in another dtype
            tdev = next(teacher.parameters()).device
            t_logp, t_idx = teacher("topk", t_ids.to(tdev), t_attn.to(tdev), pos=t_pos.to(tdev), **topk)  # (B, L, K)
        t_logp, t_idx = t_logp.to(acc.device), t_idx.to(acc.device)
    kl_tok = model("kl", s_ids.to(acc.device), s_attn.to(acc.device), pos=s_pos.to(acc.device), mask=mask, t_logp=t_logp,
                   t_idx=t_idx, chunk=cfg.loss_chunk, temperature=cfg.kl_temperature, direction=cfg.kl_direction)
    return losses.reduce_step(kl_tok, mask, n_kl), int(s_attn.sum() + t_attn.sum())


def _fitting(examples: list[QAExample], tok, cfg: TrainConfig, spec: Method, lm) -> tuple[list[QAExample], int]:
    """The examples whose chat prompt leaves room for at least one answer token within ``max_len`` and,
    with a KL term, for the whole rollout within the model's context; and how many were left out."""
    context = context_length(lm)
    room = min(cfg.max_len - 1, context - cfg.rollout_max_new_tokens if spec.kl and context else cfg.max_len - 1)
    kept = []
    for ex in examples:
        # a question far beyond the budget is not worth tokenizing
        if len(ex.question) + len(ex.system or "") <= 20 * room and len(chat_prompt_ids(tok, ex.question, ex.system)) <= room:
            kept.append(ex)
    return kept, len(examples) - len(kept)


def _seeded_order(examples: list[QAExample], seed: int) -> list[QAExample]:
    """``examples`` in a permutation fixed by ``seed`` (the replay data's order, drawn once per run)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return [examples[i] for i in order]


def _replay_examples(replay_set: list[QAExample], cfg: TrainConfig, micro_index: int, n_domain: int) -> list[QAExample]:
    """The general examples mixed into micro-batch ``micro_index``: a share ``replay_ratio`` of its CE
    batch, taken in order from ``replay_set`` (already in its seeded order, ``_seeded_order``), cycled,
    so a resumed run replays exactly what the uninterrupted one would."""
    k = round(n_domain * cfg.replay_ratio / (1 - cfg.replay_ratio))
    return [replay_set[(micro_index * k + j) % len(replay_set)] for j in range(k)]


def _swap_grads(params, stash):
    """Exchange each parameter's .grad with the stashed tensor (two gradient accumulators in turn)."""
    stash = stash or [None] * len(params)
    out = []
    for p, s in zip(params, stash):
        out.append(p.grad)
        p.grad = s
    return out


def _unsharded(cfg, model, acc):
    """The trained model gathered from its shards into a plain copy on the main process's CPU (None on
    the others): the weights the run started from, with the trained ones (all, or the adapters) loaded."""
    from raftune.models import load_model_and_tokenizer

    weights = trainable_state(model)  # collective
    if not acc.is_main_process:
        return None
    final = TokenLosses(_with_lora(cfg, load_model_and_tokenizer(cfg.model, device="cpu", dtype=cfg.dtype or "fp32")[0]))
    load_trainable_state(final, weights)
    return final


def _agreed_stop(acc, signum) -> bool:
    """Whether any process got SIGTERM: all of them stop after the same step, so their collectives match."""
    return _global(acc, float(signum is not None)) > 0


def _global(acc, value: float, mean: bool = False) -> float:
    """Sum (or mean) of a per-process number over all processes."""
    if acc.num_processes == 1:
        return value
    t = acc.reduce(torch.tensor(float(value), device=acc.device), reduction="mean" if mean else "sum")
    return float(t)


def _log(run: Path, writer, row: dict) -> None:
    append_jsonl(run / "metrics.jsonl", [{"time": round(time.time(), 3), **row}])
    if writer is not None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(k, v, row["step"])


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(run / "tensorboard"))


def _save_final(model, tok, out: Path, cfg: TrainConfig) -> None:
    """Hugging Face format (safetensors + tokenizer) that AutoModelForCausalLM loads; LoRA merged if asked."""
    if cfg.lora and cfg.merge_lora:
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(out)
    tok.save_pretrained(out)
    atomic_write_json(out / "raftune.json", {"method": cfg.method, "base_model": cfg.model,
                                             "lora": cfg.lora, "merged": cfg.lora and cfg.merge_lora})
