"""Judge-free measures of forgetting: output drift on general prompts, and weight distance.

Drift: the base model answers general prompts greedily; on those answers we measure how far the tuned
model's next-token distributions moved from the base model's, KL(p_base || p_tuned) over the full
vocabulary per answer token, and the tuned model's perplexity on them (the base model's own
perplexity is the reference it starts from). Both are 0 / equal for an unchanged model and need no judge.

    prompts = load_general_prompts("../shared/data/mt_bench/question.jsonl")
    answers = base_answers(base, tok, prompts, max_new_tokens=256)
    report = drift(base, tuned, tok, prompts, answers)

During training, ``Forgetting`` runs the same drift computation (``drift_per_prompt``) as a live
monitor on the original model's answers to general prompts (built-in ones by default,
``builtin_prompts``), adds the general-behaviour anchor to the loss, and keeps a forgetting budget
(README, "Forgetting monitor and budget").

Weight distance (paper Appendix A): ||W_ft - W_0|| / ||W_0|| per parameter tensor and its mean over
tensors (the paper reports RAFT 0.0458 vs SFT 0.0524 on SmolLM3-3B).

    result = weight_distance("runs/base-model", "runs/raft/final")
    plot_weight_distance(result, Path("runs/raft/weight_distance.png"), title="RAFT")
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from raftune import losses
from raftune.data import DataError, _json_rows, _jsonl_file, _type_name
from raftune.sequences import answer_batch, chat_prompt_ids, end_of_turn_id

log = logging.getLogger("raftune.forgetting")

# --- general prompts ---------------------------------------------------------------------------------

_PROMPT_FORMATS = ("MT-Bench question.jsonl ('turns'), AlpacaEval ('instruction'), "
                   "self-instruct user_oriented_instructions.jsonl ('instruction' + 'instances')")


def _prompt_of(row: Any, path: str, line: int) -> str:
    """The prompt of one row: MT-Bench's first turn, or the instruction with self-instruct's first input appended."""

    def fail(field: str | None, message: str):
        raise DataError(path, line, field, message)

    def text(value: Any, field: str) -> str:
        if not isinstance(value, str):
            fail(field, f"expected a string, got {_type_name(value)}")
        if not value.strip():
            fail(field, "empty")
        return value.strip()

    if not isinstance(row, dict):
        fail(None, f"expected an object, got {_type_name(row)}")
    if "turns" in row:  # MT-Bench: the second turn depends on the model's first answer, so only the first is used
        turns = row["turns"]
        if not isinstance(turns, list) or not turns:
            fail("turns", f"expected a non-empty list of strings, got {'an empty list' if turns == [] else _type_name(turns)}")
        return text(turns[0], "turns[0]")
    if "instruction" not in row:
        fail("instruction", f"missing; expected one of: {_PROMPT_FORMATS}")
    prompt = text(row["instruction"], "instruction")
    instances = row.get("instances")
    if instances is None:
        return prompt
    if not isinstance(instances, list):
        fail("instances", f"expected a list, got {_type_name(instances)}")
    if not instances:
        return prompt
    first = instances[0]
    if not isinstance(first, dict):
        fail("instances[0]", f"expected an object, got {_type_name(first)}")
    extra = first.get("input", "")
    if not isinstance(extra, str):
        fail("instances[0].input", f"expected a string, got {_type_name(extra)}")
    return f"{prompt}\n\n{extra.strip()}" if extra.strip() else prompt  # self-instruct: an empty input means none


def load_general_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """General prompts from a .jsonl or .json (JSON array) file, either optionally .gz.

    Rows are MT-Bench questions (the first of ``turns``), AlpacaEval rows (``instruction``) or
    self-instruct's user-oriented instructions (``instruction``, then ``instances[0].input`` after a
    blank line when not empty). A bad row raises ``DataError`` naming its line (its item for .json).
    """
    if limit is not None and (int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 or None, got {limit!r}")
    p = Path(path).expanduser()
    label = str(path)
    name = p.name.lower().removesuffix(".gz")
    if not name.endswith((".jsonl", ".json")):
        raise DataError(label, None, None, f"expected a .jsonl or .json file (optionally .gz) of {_PROMPT_FORMATS}")
    if not p.is_file():
        raise DataError(label, None, None, "no such file")
    rows: Iterator[tuple[int, Any]] = _jsonl_file(p, label) if name.endswith(".jsonl") else _json_rows(p, label)
    prompts = []
    for line, row in rows:
        prompts.append(_prompt_of(row, label, line))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise DataError(label, None, None, "no prompts in the file")
    return prompts


# --- drift: KL and perplexity on the base model's answers ---------------------------------------------

def base_answers(base_model, tok, prompts: list[str], *, max_new_tokens: int = 256, batch_size: int = 16) -> list[str]:
    """The base model's greedy answer to each prompt (one user turn in its chat format), in order."""
    from raftune.generation import LocalGenerator, SamplingParams

    gen = LocalGenerator(base_model, tok, "base", batch_size=batch_size)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    return [c.text for c in gen.chat(convs, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _final_hidden(model, ids_BT: torch.Tensor, attn_BT: torch.Tensor) -> torch.Tensor:
    """(B, T, D) hidden states before the LM head; the model's own LM head runs on the last position only."""
    out = model(input_ids=ids_BT, attention_mask=attn_BT, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def _answer_positions(lmask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_BL, mask_BL): the positions of each row's answer tokens (``answer_batch``'s label mask), left-aligned."""
    n_B = lmask_BT.sum(1)
    pos_BL = torch.zeros((lmask_BT.shape[0], max(int(n_B.max()), 1)), dtype=torch.long)
    mask_BL = torch.zeros(pos_BL.shape, dtype=torch.bool)
    for i, row in enumerate(lmask_BT):
        at = row.nonzero().squeeze(1)
        pos_BL[i, : len(at)], mask_BL[i, : len(at)] = at, True
    return pos_BL, mask_BL


# A scorer runs one model on a batch, (ids_BT, attn_BT, pos_BL) -> logits_of, and logits_of(slice) gives
# that model's (B, c, V) logits at positions pos_BL[:, slice], on its own device: drift asks for them a
# chunk at a time, at the answer tokens only.
Logits = Callable[[slice], torch.Tensor]
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Logits]


def model_scorer(model) -> Scorer:
    """The scorer of a causal LM called directly (the eval suite's models)."""
    dev, head = _device(model), model.get_output_embeddings()

    def score(ids_BT: torch.Tensor, attn_BT: torch.Tensor, pos_BL: torch.Tensor) -> Logits:
        h_BTD = _final_hidden(model, ids_BT.to(dev), attn_BT.to(dev))
        h_BLD = h_BTD.gather(1, pos_BL.to(dev).unsqueeze(-1).expand(-1, -1, h_BTD.shape[-1]))
        return lambda sl: head(h_BLD[:, sl])

    return score


@torch.no_grad()  # not inference_mode: the monitor runs it on the training model, whose tensors autograd uses next
def drift_per_prompt(base: Scorer, tuned: Scorer, tok, eot: int, prompts: list[str], answers: list[str], *,
                     batch_size: int = 8, chunk: int = 128, nll: bool = True) -> list[dict]:
    """Per prompt: the per-token means of KL(p_base || p_tuned) and (``nll``) of the tuned and the base
    NLL on its answer, and its token count. The one computation behind ``drift`` (the eval suite) and
    the training monitor (``Forgetting``, which needs no NLL), so that on the same prompts, answers and
    models both give the same value. Logits exist at the answer positions only, ``chunk`` at a time."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else eot
    per_prompt = []
    for s in range(0, len(prompts), batch_size):
        p_ids = [chat_prompt_ids(tok, q) for q in prompts[s : s + batch_size]]
        # no length cap: cutting answers would change what is measured
        ids, attn, labels, mask, _ = answer_batch(tok, p_ids, answers[s : s + batch_size], eot,
                                                  max_len=2**62, pad_id=pad)  # (B, T) each
        pos_BL, mask_BL = _answer_positions(mask)
        labels_BL = labels.gather(1, pos_BL)
        z_base, z_tuned = base(ids, attn, pos_BL), tuned(ids, attn, pos_BL)
        kl_BL = nll_t_BL = nll_b_BL = None
        for c in range(0, pos_BL.shape[1], chunk):
            sl = slice(c, c + chunk)
            z_b = z_base(sl)  # (B, c, V)
            z_t = z_tuned(sl).to(z_b.device)  # (B, c, V)
            if kl_BL is None:
                kl_BL = torch.zeros(mask_BL.shape, dtype=torch.float64, device=z_b.device)
                nll_t_BL, nll_b_BL = torch.zeros_like(kl_BL), torch.zeros_like(kl_BL)
                labels_BL, mask_BL = labels_BL.to(z_b.device), mask_BL.to(z_b.device)
            # a KL is >= 0; fp32 rounding leaves about -1e-6 where the two models barely differ
            kl_BL[:, sl] = losses.full_kl(z_t, z_b, mask_BL[:, sl], temperature=1.0, direction="forward").double().clamp_min(0)
            if nll:
                nll_t_BL[:, sl] = losses.token_ce(z_t, labels_BL[:, sl], mask_BL[:, sl]).double()
                nll_b_BL[:, sl] = losses.token_ce(z_b, labels_BL[:, sl], mask_BL[:, sl]).double()
        for kl, nt, nb, n in zip(kl_BL.sum(1).tolist(), nll_t_BL.sum(1).tolist(), nll_b_BL.sum(1).tolist(),
                                 mask_BL.sum(1).tolist()):
            per_prompt.append({"kl": kl / n, "n_tokens": int(n), **({"tuned_nll": nt / n, "base_nll": nb / n} if nll else {})})
    return per_prompt


def token_mean(per_prompt: list[dict], key: str) -> float:
    """The mean of ``key`` over all answer tokens of ``drift_per_prompt``'s rows, not a mean of per-prompt means."""
    return sum(r[key] * r["n_tokens"] for r in per_prompt) / sum(r["n_tokens"] for r in per_prompt)


@torch.inference_mode()
def drift(base_model, tuned_model, tok, prompts: list[str], answers: list[str], *, batch_size: int = 8,
          chunk: int = 128) -> dict:
    """KL(p_base || p_tuned) and both models' perplexities on ``answers`` (normally `base_answers`).

    Each answer is scored as the model's reply to its prompt in the chat format, followed by the
    end-of-turn token (an answer cut by max_new_tokens is scored as if it had ended there). The
    logits and the full-vocabulary log-softmax exist for ``chunk`` positions at a time. The KL is
    summed over the vocabulary per answer token and averaged over all answer tokens of all prompts;
    perplexity is exp(mean NLL per answer token). ``per_prompt`` holds the same as per-token means
    of each prompt, with its token count.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no prompts to measure drift on")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eot = end_of_turn_id(tok, base_model.generation_config)
    modes = base_model.training, tuned_model.training
    base_model.eval()
    tuned_model.eval()
    try:
        per_prompt = drift_per_prompt(model_scorer(base_model), model_scorer(tuned_model), tok, eot, prompts, answers,
                                      batch_size=batch_size, chunk=chunk)
    finally:
        base_model.train(modes[0])
        tuned_model.train(modes[1])
    return {
        "kl_base_to_tuned": token_mean(per_prompt, "kl"),
        "tuned_perplexity": math.exp(token_mean(per_prompt, "tuned_nll")),
        "base_perplexity": math.exp(token_mean(per_prompt, "base_nll")),
        "n_tokens": sum(r["n_tokens"] for r in per_prompt),
        "per_prompt": per_prompt,
    }


# --- during training: the live monitor, the anchor and the budget --------------------------------------

BUILTIN_PROMPTS = {"monitor": "monitor.jsonl", "anchor": "anchor.jsonl"}
MONITOR_BATCH = 8  # the drift suite's batch at eval's default batch size (16 // 2)
MONITOR_CHUNK = 128  # drift's default chunk: the same arithmetic as the suite


def builtin_prompts(kind: str) -> Path:
    """raftune's own general prompts (package data, written for it): ``monitor`` or ``anchor``, disjoint sets."""
    from importlib.resources import files

    return Path(str(files("raftune") / "prompts" / BUILTIN_PROMPTS[kind]))


def prompt_sources(cfg) -> dict[str, str | None]:
    """The prompt files a training config's monitor and anchor read (None: that part is off)."""
    return {"monitor": (cfg.monitor_data or str(builtin_prompts("monitor"))) if cfg.monitor_interval else None,
            "anchor": (cfg.anchor_data or str(builtin_prompts("anchor"))) if cfg.anchored else None}


def _normal(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def disjoint(monitor: list[str], anchor: list[str], monitor_src: str, anchor_src: str) -> None:
    """Refuse anchor prompts that are also monitor prompts (compared case- and space-insensitively): the
    anchor trains on what it holds, so the monitor would no longer be a held-out measure."""
    shared = sorted({_normal(p) for p in monitor} & {_normal(p) for p in anchor})
    if shared:
        raise ValueError(f"anchor_data {anchor_src} and monitor_data {monitor_src} share {len(shared)} prompt(s) "
                         f"(first: {shared[0][:80]!r}): the anchor trains on its prompts, so the monitor must not "
                         "measure on them; give disjoint files")


class Forgetting:
    """The forgetting monitor, the general-behaviour anchor and the forgetting budget of one training
    run (README, "Forgetting monitor and budget"). ``raftune.train`` makes one after its models and
    calls it at a few points of its loop; every process calls the same methods at the same steps.

    The original model is the run's teacher where it holds one (full fine-tuning with a KL term, or
    ``teacher_model``), else under LoRA the student with its adapters off, else (full fine-tuning
    without a teacher) the frozen copy ``build_models`` made for it. ``model`` and ``teacher`` are
    the trainer's ``TokenLosses`` (``model`` wrapped by accelerate or sharded).
    """

    def __init__(self, cfg, run: Path, tok, eot: int, acc, model, teacher):
        from raftune.losses import BudgetController

        self.cfg, self.run, self.tok, self.eot, self.acc, self.model, self.teacher = cfg, run, tok, eot, acc, model, teacher
        self.every = cfg.monitor_interval
        self.lm = acc.unwrap_model(model).lm
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # as the optimizer holds them (sharded)
        if teacher is None and (self.every or cfg.anchored) and not hasattr(self.lm, "disable_adapter"):
            raise AssertionError("no original model in memory: build_models makes a frozen copy for the monitor")
        self.controller = None if cfg.forgetting_budget is None else BudgetController(
            cfg.forgetting_budget, cfg.anchor_weight if cfg.anchor_weight is not None else 1.0, cfg.budget_rate,
            cfg.anchor_weight_bounds, cfg.budget_warmup, cfg.budget_derivative)
        self.points: list[dict] = []  # the budget's measured points: step, drift, held-out loss
        self.best: dict | None = None  # the best point within the budget so far, its weights kept aside
        self.last: float | None = None  # the latest drift (the progress bar)
        self._original_h: list[torch.Tensor] = []  # the original's hidden states at the monitor's answer tokens (_scorer)
        self.answers_s = 0.0  # seconds spent making the original's answers in this process
        src = prompt_sources(cfg)
        prompts = {k: load_general_prompts(v, limit=cfg.monitor_limit) for k, v in src.items() if v}
        if len(prompts) == 2:
            disjoint(prompts["monitor"], prompts["anchor"], src["monitor"], src["anchor"])
        self.monitor = self._answers("monitor", src["monitor"], prompts["monitor"]) if self.every else []
        anchor = self._answers("anchor", src["anchor"], prompts["anchor"]) if cfg.anchored else []
        order = torch.randperm(len(anchor), generator=torch.Generator().manual_seed(cfg.seed + 104729)).tolist()
        self.anchor = [(chat_prompt_ids(tok, anchor[i][0]), anchor[i][1]) for i in order]  # a seeded cycle, fixed per run

    # --- the original model's greedy answers, made once per run and kept in the run folder

    def _original_off(self):
        """The context in which the original model runs: the adapters off where it is the student itself."""
        return self.lm.disable_adapter() if self.teacher is None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _gathered(self, *modules):
        """``distributed.gathered`` for each module, then the trainable parameters trainable again: peft's
        ``disable_adapter`` switches requires_grad off and on on the parameters registered at the time,
        which inside a gathered FSDP2 block are the unsharded ones, not those the optimizer holds."""
        from raftune.distributed import gathered

        try:
            with contextlib.ExitStack() as stack:
                for m in dict.fromkeys(modules):
                    stack.enter_context(gathered(m))
                yield
        finally:
            for p in self.trainable:
                p.requires_grad_(True)

    def _answers(self, kind: str, source: str, prompts: list[str]) -> list[tuple[str, str]]:
        """The original model's greedy answers to ``prompts``: the run folder's ``<kind>_answers.json``
        (a resumed run reuses it), else the copy another run of the same original model, prompts and
        length made on this machine (``$RAFTUNE_CACHE/original-answers``), else made now."""
        from raftune import outputs
        from raftune.files import atomic_write_json, stable_hash
        from raftune.models import cache_dir

        path = self.run / f"{kind}_answers.json"
        spec = self.cfg.teacher_model if self.cfg.spec.kl and self.cfg.teacher_model else self.cfg.model
        made_by = {"original": "teacher" if self.teacher is not None and self.cfg.spec.kl else
                   "frozen copy" if self.teacher is not None else "base model, LoRA adapters off",
                   "model": spec, "model_fingerprint": outputs.model_fingerprint(spec), "prompts": source,
                   "prompts_fingerprint": outputs.data_fingerprint(source), "limit": self.cfg.monitor_limit,
                   "max_new_tokens": self.cfg.monitor_max_new_tokens}
        module = self.teacher if self.teacher is not None else self.model
        weights = next(module.parameters())  # greedy decoding may differ with the device and the dtype
        key = {k: made_by[k] for k in ("model_fingerprint", "prompts_fingerprint", "limit", "max_new_tokens")}
        cached = cache_dir() / "original-answers" / f"{stable_hash({**key, 'device': weights.device.type, 'dtype': str(weights.dtype)}, 16)}.json"
        rows = None
        if self.acc.is_main_process and not path.exists() and cached.is_file():
            rows = json.loads(cached.read_text(encoding="utf-8"))["rows"]
        todo = self._from_main(self.acc.is_main_process and not path.exists() and rows is None)
        if todo:  # every process: a sharded model's forward needs them all
            rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, self._generate(prompts))]
        if self.acc.is_main_process and rows is not None:
            atomic_write_json(path, {"made_by": made_by, "rows": rows})
            if todo:
                cached.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(cached, {"made_by": made_by, "rows": rows})
        self.acc.wait_for_everyone()
        saved = json.loads(path.read_text(encoding="utf-8"))  # every process reads the main one's answers
        if {k: saved.get("made_by", {}).get(k) for k in key} != key:
            raise ValueError(f"{path}: made by {saved.get('made_by')}, but this run's original model and prompts are "
                             f"{made_by}: not this run's answers")
        return [(r["prompt"], r["answer"]) for r in saved["rows"]]

    def _generate(self, prompts: list[str]) -> list[str]:
        """Greedy answers of the original model through the decode engine (the rollouts' path), 16 at a time."""
        import time

        from raftune.models import context_length, eval_mode
        from raftune.rollout import RolloutConfig

        t0 = time.perf_counter()
        module = self.teacher if self.teacher is not None else self.model
        n_new = self.cfg.monitor_max_new_tokens
        # eager: a one-time generation, and a graph captured with LoRA's adapters off must never serve the rollouts
        greedy = RolloutConfig(n_new, temperature=0.0, top_p=1.0, compile="off")
        ids = [chat_prompt_ids(self.tok, p) for p in prompts]
        context = context_length(self.lm)
        if context and (long := [p for p, i in zip(prompts, ids) if len(i) + n_new > context]):
            raise ValueError(f"{len(long)} monitor or anchor prompt(s) leave no room for {n_new} new tokens within the "
                             f"model's context of {context} (first: {long[0][:60]!r}): shorten them or lower "
                             "monitor_max_new_tokens")
        answers = []
        with self._gathered(module), torch.no_grad(), self._original_off(), eval_mode(module):
            for s in range(0, len(ids), 16):
                traj_BL, mask_BL = module("rollout", ids[s : s + 16], greedy, self.tok.pad_token_id,
                                          {self.eot, self.tok.eos_token_id})
                answers += [self.tok.decode(t[m].tolist(), skip_special_tokens=True).strip() for t, m in zip(traj_BL, mask_BL)]
        self.answers_s += time.perf_counter() - t0
        return answers

    # --- the monitor

    def _scorer(self, module, original: bool) -> Scorer:
        """A scorer of the trainer's ``TokenLosses`` ``module`` (its forward: DDP's and FSDP's hooks run).
        The original's hidden states at the answer tokens are the same at every measurement (it never
        changes): made at the first, kept (``_original_h``, one (B, L, D) tensor per batch of
        ``MONITOR_BATCH`` prompts), and only its head runs again, so a measurement costs one forward, the
        student's, not two. The same tensors as a fresh forward: the value stays the suite's exactly.
        Not where the original is sharded (FSDP): its head's weight is whole only after its own forward."""
        from raftune.distributed import is_sharded

        lm = self.lm if module is self.model else module.lm
        head = lm.get_output_embeddings()
        dev = self.acc.device if module is self.model else _device(module)
        off = self._original_off if original else contextlib.nullcontext
        batches = itertools.count()  # drift_per_prompt scores the batches in order, once each
        keep = original and not is_sharded(module)

        def score(ids_BT: torch.Tensor, attn_BT: torch.Tensor, pos_BL: torch.Tensor) -> Logits:
            i = next(batches)
            if keep and i < len(self._original_h):
                h_BLD = self._original_h[i]
                if h_BLD.shape[:2] != pos_BL.shape:
                    raise AssertionError(f"monitor batch {i}: kept hidden states {tuple(h_BLD.shape)}, positions {tuple(pos_BL.shape)}")
            else:
                with off():
                    h_BLD = module("hidden", ids_BT.to(dev), attn_BT.to(dev), pos=pos_BL.to(dev), chunk=MONITOR_CHUNK)
                if keep:
                    self._original_h.append(h_BLD)

            def logits(sl: slice) -> torch.Tensor:
                with off():
                    return head(h_BLD[:, sl])
            return logits

        return score

    def measure(self) -> float:
        """The student's drift now: the token mean of KL(original || student) on the monitor's answers,
        computed by every process (a sharded model needs them all) and averaged, so all agree on it."""
        from raftune.models import eval_mode

        original = self.teacher if self.teacher is not None else self.model
        prompts, answers = [p for p, _ in self.monitor], [a for _, a in self.monitor]
        with self._gathered(self.model, original), eval_mode(self.model):
            rows = drift_per_prompt(self._scorer(original, original=True), self._scorer(self.model, original=False),
                                    self.tok, self.eot, prompts, answers, batch_size=MONITOR_BATCH, chunk=MONITOR_CHUNK,
                                    nll=False)
        return self._mean(token_mean(rows, "kl"))

    def _mean(self, value: float) -> float:
        if self.acc.num_processes == 1:
            return value
        return float(self.acc.reduce(torch.tensor(value, dtype=torch.float64, device=self.acc.device), reduction="mean"))

    def _from_main(self, value):
        """The main process's ``value`` on every process (the held-out loss is computed there alone under DDP)."""
        if self.acc.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def due(self, step: int, last: bool = False) -> bool:
        """Whether the drift is measured after ``step`` optimizer steps (``last``: the run's last step)."""
        return bool(self.every) and (step % self.every == 0 or last)

    def wants_eval(self, step: int, last: bool = False) -> bool:
        """With a budget, every measured point needs its held-out domain loss."""
        return self.controller is not None and self.due(step, last)

    def after_step(self, step: int, eval_loss: float | None, last: bool = False) -> dict:
        """At a monitor step (step 0 and the last included): the drift measured and, with a budget, the
        controller and the budget's choice updated. Returns the metrics to log."""
        import time

        if not self.due(step, last):
            return {}
        t0 = time.perf_counter()
        row = {"drift_kl": self.measure()}
        self.last = row["drift_kl"]
        if self.controller is not None:
            self.controller.update(row["drift_kl"], step)
            self._consider({"step": step, "drift_kl": row["drift_kl"], "eval_domain_loss": self._from_main(eval_loss)}, last)
        row["monitor_s"] = round(time.perf_counter() - t0, 3)
        if step == 0 and self.answers_s:
            row["monitor_answers_s"] = round(self.answers_s, 3)
        return row

    # --- the anchor

    def anchor_backward(self, step: int) -> tuple[float, float] | None:
        """Backpropagate mu * KL(original || student) on this step's anchor answers (``anchor_batch`` per
        process, the next ones of the seeded cycle); returns (the KL over all processes, mu), or None."""
        from raftune.models import eval_mode

        if not self.anchor:
            return None
        acc, cfg, tok = self.acc, self.cfg, self.tok
        mu = self.controller.mu if self.controller is not None else float(cfg.anchor_weight)
        n_all = cfg.anchor_batch * acc.num_processes
        rows = [self.anchor[(step * n_all + j) % len(self.anchor)] for j in range(n_all)][acc.process_index :: acc.num_processes]
        ids, attn, _, lmask, _ = answer_batch(tok, [p for p, _ in rows], [a for _, a in rows], self.eot, cfg.max_len,
                                              tok.pad_token_id)
        pos_BL, mask_BL = _answer_positions(lmask)
        n_tokens = int(mask_BL.sum())  # the step's count over all processes / their number (losses.reduce_step)
        if acc.num_processes > 1:
            n_tokens = float(acc.reduce(torch.tensor(float(n_tokens), device=acc.device), reduction="mean"))
        original = self.teacher if self.teacher is not None else self.model
        dev = acc.device if original is self.model else _device(original)
        with acc.autocast():
            with torch.no_grad(), self._original_off(), eval_mode(original):
                logp_BLV = original("logprobs", ids.to(dev), attn.to(dev), pos=pos_BL.to(dev), chunk=cfg.loss_chunk)
            mask_BL = mask_BL.to(acc.device)
            kl_BL = self.model("anchor", ids.to(acc.device), attn.to(acc.device), pos=pos_BL.to(acc.device), mask=mask_BL,
                               t_logp=logp_BLV.to(acc.device), chunk=cfg.loss_chunk)
            loss = losses.reduce_step(kl_BL, mask_BL, n_tokens)
        acc.backward(loss * mu)
        return self._mean(float(loss.detach())), mu

    # --- the budget's choice of what model/ holds

    def _consider(self, point: dict, last: bool) -> None:
        """Record a measured point; one within the budget with the best held-out loss so far (the latest,
        without eval_data) has its trainable weights kept aside, out of the checkpoints' rotation."""
        self.points.append(point)
        if point["step"] < 1 or point["drift_kl"] > self.controller.budget:  # step 0 is the model it started from
            return
        loss, best = point["eval_domain_loss"], self.best
        if best is not None and loss is not None and best["eval_domain_loss"] is not None and loss >= best["eval_domain_loss"]:
            return
        self.best = point
        if not last:  # the last step's weights are the model's own at the end
            self._keep_aside(point)

    def _keep_aside(self, point: dict) -> None:
        from safetensors.torch import save_file

        from raftune.checkpoint import replace_folder
        from raftune.distributed import is_sharded, trainable_state

        if not (is_sharded(self.model) or self.acc.is_main_process):
            return
        weights = trainable_state(self.acc.unwrap_model(self.model))  # collective when sharded
        if self.acc.is_main_process:
            def write(tmp: Path) -> None:
                save_file(weights, str(tmp / "trainable.safetensors"))
                (tmp / "point.json").write_text(json.dumps(point))

            replace_folder(self.run / "budget-best", write)

    def choose(self, final_model) -> dict | None:
        """Main process, at the end, with a budget: load into ``final_model`` the weights ``model/`` gets
        (those of the best point within the budget) and write the choice and why into config.json."""
        from safetensors.torch import load_file

        from raftune.distributed import load_trainable_state
        from raftune.files import atomic_write_json

        if self.controller is None:
            return None
        budget, last = self.controller.budget, self.points[-1]
        within = [p for p in self.points if p["step"] >= 1 and p["drift_kl"] <= budget]
        report = {"forgetting_budget": budget, "final_step": last["step"], "measured_points": len(self.points),
                  "within_budget": len(within), "anchor_weight_final": self.controller.mu, "points": self.points}
        if self.best is None:
            lowest = min((p for p in self.points if p["step"] >= 1), key=lambda p: p["drift_kl"])
            why = (f"not met: no measured point after step 0 had drift <= {budget:g} (the lowest, {lowest['drift_kl']:.4g}, "
                   f"at step {lowest['step']}); model/ is the final model")
            log.warning("forgetting budget %s", why)
            report.update(met=False, step=last["step"], why=why)
        else:
            best = self.best
            if best["step"] != last["step"]:
                kept = self.run / "budget-best"
                if json.loads((kept / "point.json").read_text())["step"] != best["step"]:
                    raise ValueError(f"{kept}: holds another step's weights than the budget's choice, step {best['step']}")
                load_trainable_state(final_model, load_file(str(kept / "trainable.safetensors")))
            how = ("the lowest held-out domain loss" if best["eval_domain_loss"] is not None else
                   "the latest (no eval_data: no held-out domain loss to compare)")
            why = f"step {best['step']}: {how} of the {len(within)} measured point(s) within the budget {budget:g}"
            log.info("forgetting budget met; model/ is %s (drift %.4g)", why, best["drift_kl"])
            report.update(met=True, step=best["step"], drift_kl=best["drift_kl"],
                          eval_domain_loss=best["eval_domain_loss"], why=why)
        config = self.run / "config.json"
        atomic_write_json(config, {**json.loads(config.read_text()), "budget": report})
        return report

    # --- resume

    def state_dict(self) -> dict:
        """Plain JSON for the checkpoint: the controller, the measured points and the kept one."""
        return {"controller": self.controller.state_dict() if self.controller else None, "points": self.points,
                "best": self.best, "last": self.last}

    def load_state_dict(self, d: dict) -> None:
        if self.controller is not None:
            self.controller.load_state_dict(d["controller"])
        self.points, self.best, self.last = list(d["points"]), d["best"], d["last"]


# --- weight distance ---------------------------------------------------------------------------------

Loader = Callable[[], torch.Tensor]


def _folder_tensors(path: Path) -> tuple[dict[str, Loader], dict[str, str]]:
    """Name -> loader for every tensor of the safetensors file(s), read one tensor at a time."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no .safetensors files (weight_distance reads safetensors folders; "
                         f"load other formats as a model and pass it instead)")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name in where:
                    raise ValueError(f"{path}: tensor {name!r} is in both {where[name].name} and {f.name}")
                where[name] = f

    def loader(name: str, f: Path) -> Loader:
        def load() -> torch.Tensor:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                return st.get_tensor(name)
        return load

    return {name: loader(name, f) for name, f in where.items()}, {}  # save_pretrained stores tied weights once


def _dict_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, Loader], dict[str, str]]:
    """Name -> loader, and alias -> first name for tensors that share their data (tied weights)."""
    seen: dict[tuple, str] = {}
    tensors: dict[str, Loader] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is {type(t).__name__}, not a tensor")
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = (lambda t=t: t)
    return tensors, aliases


def _tensors(source) -> tuple[dict[str, Loader], dict[str, str]]:
    if isinstance(source, torch.nn.Module):
        return _dict_tensors(source.state_dict())
    if isinstance(source, dict):
        return _dict_tensors(source)
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"{source}: no such folder or file")
        return _folder_tensors(path)
    raise TypeError(f"expected a folder, a .safetensors file, a state dict or a module, got {type(source).__name__}")


def _sq_norms(a: torch.Tensor, b: torch.Tensor, block: int = 1 << 22) -> tuple[float, float]:
    """(||a||^2, ||a - b||^2) in fp64, a block of elements at a time so no fp64 copy of a whole tensor exists."""
    a, b = a.reshape(-1), b.reshape(-1).to(a.device)
    base = diff = 0.0
    for s in range(0, a.numel(), block):
        a64, b64 = a[s : s + block].double(), b[s : s + block].double()
        base += float(a64.square().sum())
        diff += float((b64 - a64).square().sum())
    return base, diff


def _some(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "") if names else "none"


@torch.no_grad()
def weight_distance(base: str | Path | dict | torch.nn.Module, tuned: str | Path | dict | torch.nn.Module) -> dict:
    """Relative L2 distance ||W_ft - W_0|| / ||W_0|| per tensor, and its mean over tensors.

    ``base`` and ``tuned`` are each a safetensors folder (or file), a state dict, or a module. Folders
    are read tensor by tensor. Tensors present on one side only, or of different shapes, raise a
    ValueError naming them; a tied copy (same data under a second name) counts once and may be absent
    from the other side. Base tensors of norm 0 and non-float tensors (buffers) are skipped and listed.

    Returns {"mean", "per_tensor": {name: distance}, "n_tensors", "skipped_zero_norm": [names],
    "skipped_non_float": [names]}.
    """
    b_tensors, b_alias = _tensors(base)
    t_tensors, t_alias = _tensors(tuned)
    b_names, t_names = [*b_tensors, *b_alias], [*t_tensors, *t_alias]
    b_set, t_set = set(b_names), set(t_names)
    # one comparison per pair of stored tensors, named by the first name that gives it
    pairs: dict[tuple[str, str], str] = {}
    for name in dict.fromkeys(b_names + t_names):
        if name in b_set and name in t_set:
            pairs.setdefault((b_alias.get(name, name), t_alias.get(name, name)), name)
    # a name on one side only is fine when it is a tied copy whose data is compared under another name
    compared_b, compared_t = {b for b, _ in pairs}, {t for _, t in pairs}
    only_base = [n for n in b_names if n not in t_set and b_alias.get(n, n) not in compared_b]
    only_tuned = [n for n in t_names if n not in b_set and t_alias.get(n, n) not in compared_t]
    if only_base or only_tuned:
        raise ValueError(f"the models hold different tensors: only in base {_some(only_base)}, "
                         f"only in tuned {_some(only_tuned)}")

    per_tensor: dict[str, float] = {}
    zero, non_float, bad_shape = [], [], []
    for (b_name, t_name), name in pairs.items():
        w0, w1 = b_tensors[b_name](), t_tensors[t_name]()
        if w0.shape != w1.shape:
            bad_shape.append(f"{name} {tuple(w0.shape)} vs {tuple(w1.shape)}")
            continue
        if not (w0.is_floating_point() and w1.is_floating_point()):
            non_float.append(name)
            continue
        base_sq, diff_sq = _sq_norms(w0, w1)
        if base_sq == 0.0:
            zero.append(name)
            continue
        per_tensor[name] = math.sqrt(diff_sq / base_sq)
    if bad_shape:
        raise ValueError(f"tensors differ in shape (base vs tuned): {_some(bad_shape)}")
    if not per_tensor:
        raise ValueError("no tensor to compare: every shared tensor has norm 0 or is not floating point")
    return {
        "mean": sum(per_tensor.values()) / len(per_tensor),
        "per_tensor": per_tensor,
        "n_tensors": len(per_tensor),
        "skipped_zero_norm": zero,
        "skipped_non_float": non_float,
    }


def plot_weight_distance(result: dict, out_png: Path, title: str = "") -> Path:
    """A histogram of `weight_distance`'s per-tensor distances with its mean marked; returns ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(result["per_tensor"].values())
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
    ax.axvline(result["mean"], color="tab:red", linestyle="--", label=f"mean {result['mean']:.4f}")
    ax.set_xlabel("||W_ft - W_0|| / ||W_0||")
    ax.set_ylabel("tensors")
    ax.set_title(title or f"relative weight distance ({result['n_tensors']} tensors)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
