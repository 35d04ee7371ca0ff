"""The decode engine: batched generation from token ids for every local model of raftune.

    engine = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids={eot, tok.eos_token_id})
    out = engine.generate(prompt_ids, max_new_tokens=256, temperature=1.0)   # out.tokens_BN, out.mask_BN

One code path serves the student's rollouts (``raftune.rollout``), the local backend of every stage
(``LocalGenerator``: rewrites, fusion, judges, evaluation answers) and the drift suite's base answers.

Why not ``model.generate``: on a GPU its per-token CPU overhead dominates (642 tokens/s at batch 64 on
an H100 for a model whose decode step is well under a millisecond of GPU work,
../shared/gpu/README.md), and its static-cache path allocates the KV cache in the weights' dtype,
which crashes under bf16 autocast with fp32 master weights (the trainer's case). The engine:

- owns its KV cache (a transformers ``StaticCache``, allocated up front by the engine in the compute
  dtype: the autocast dtype when decoding runs under autocast, else the weights' dtype; key and value
  states are cast into it, so fp32 master weights decode in bf16 with a bf16 cache);
- prefills eagerly, then runs one decode step (forward on one token per row, greedy or sampled pick,
  stop check) at a time; with ``compile`` on, that step is ``torch.compile``d (CUDA: mode
  ``reduce-overhead``, which replays it as a CUDA graph), and shapes are bucketed (rows to the
  caller's batch size or a power of two, cache length to a power of two, at least ``min_length``)
  so the compiled graphs are reused across batches and calls; the host waits on the device only every
  ``sync_every`` steps, to see whether every row has stopped;
- stops when every row has produced an end-of-turn token or, where the caller passes stop strings
  (lm-eval's ``until``), a stop string in its decoded text, or after ``max_new_tokens``. Rows that
  stopped are padded with ``pad_id``; the mask keeps each row up to and including its first end token
  (a row stopped on a stop string: every token it generated). Stop strings are checked on the host at
  the synchronisation points the loop already has, and only once the text before the first stop string
  can no longer change (``first_stop_is_final``): the caller still cuts the text (a stop string may span
  tokens), and gets the text it would get from decoding to the end.

The fast path never kills a run: if compiling the step fails (a missing or broken Triton or C++
toolchain, an inductor error, an op it cannot capture, a failed CUDA-graph capture), the engine logs
one warning per process, runs the failed step again eagerly (the same token: the step only writes the
KV cache in place, at the same positions with the same values), decodes eagerly from then on, and
says why in ``compile_fallback`` (``compile_fallback_of(model)``), which the trainer and the
evaluation record in their outputs.

Sampling draws from the global torch RNG (seed it with ``torch.manual_seed``): exponential race
(argmax of p / E with E ~ Exp(1)), which samples from p with no host synchronisation. Greedy decoding
equals ``model.generate``'s greedy output token for token (tested in fp32 on CPU).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from raftune.models import context_length, eval_mode
from raftune.sequences import pad_left

log = logging.getLogger("raftune.generation.engine")

_fallback_warned = False  # one warning per process: every engine of a run hits the same broken toolchain

CompileMode = Literal["auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = CompileMode.__args__


@dataclass(frozen=True)
class Generation:
    """What one ``generate`` call made, on the CPU, one row per prompt, N = max_new_tokens."""

    tokens_BN: torch.Tensor  # (B, N) long; pad_id after a row's end token, or after a row stopped on a stop string
    mask_BN: torch.Tensor  # (B, N) bool; True up to and including the first end token, or every token generated
    stopped_B: torch.Tensor  # (B,) bool; an end token or a stop string ended the row (False: max_new_tokens)
    on_stop_B: torch.Tensor  # (B,) bool; a stop string ended the row: no end token, and the few tokens made
    # after the stop string until the engine saw it are kept; the caller cuts the text at the stop string

    @property
    def lengths_B(self) -> torch.Tensor:
        """(B,) tokens before the end token (the end token itself excluded); a row stopped on a stop
        string: every token it generated."""
        return self.mask_BN.sum(dim=1) - (self.stopped_B & ~self.on_stop_B).long()


def end_mask(tokens_BN: torch.Tensor, eos_ids) -> torch.Tensor:
    """(B, N) bool: True up to and including the first end token of each row."""
    is_end_BN = torch.isin(tokens_BN, torch.tensor(sorted(eos_ids), dtype=tokens_BN.dtype))
    return ~((is_end_BN.cumsum(dim=1) - is_end_BN.long()) > 0)  # no end token strictly earlier in the row


# Characters a stop string's first occurrence waits for past the longest stop string: the detokenizer may
# still change the last few characters of a text when tokens follow (a space dropped before punctuation).
STOP_LOOKAHEAD = 4
STOP_WINDOW_MARGIN = 8  # tokens decoded past what the longest stop string and the lookahead need


def first_stop_is_final(text: str, stops: Sequence[str]) -> bool:
    """Whether ``text`` holds a stop string whose first occurrence no continuation can move: cutting it
    there gives what cutting the text of any longer generation at its first stop string gives.

    A continuation can change the end of a text (complete a UTF-8 sequence shown as U+FFFD, drop a space
    before punctuation) and can complete a longer stop string begun before the first one found: the
    occurrence counts once the text runs the longest stop string plus ``STOP_LOOKAHEAD`` characters past
    its start, trailing U+FFFD not counted. Empty stop strings are ignored (as lm-eval's cut does)."""
    stops = [s for s in stops if s]
    stable = text.rstrip("\ufffd")
    first = min((i for i in (stable.find(s) for s in stops) if i >= 0), default=-1)
    return first >= 0 and len(stable) - first >= max(map(len, stops)) + STOP_LOOKAHEAD


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def pick_tokens(logits_BV: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B,) next tokens: argmax when temperature is 0, else a draw from softmax(logits / T) restricted to
    the top-p nucleus (the smallest set of most likely tokens whose mass reaches top_p)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass of the more likely tokens
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)  # the first token always stays
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    race_BV = torch.empty_like(probs_BV).exponential_().clamp_(min=1e-20)  # never 0: 0/0 would be a NaN that argmax picks
    return (probs_BV / race_BV).argmax(dim=-1)


def _decode_step(model, cache_kw: str, cache, tok_B1, pos_B1, mask_BL, done_B, eos_E, pad_id: int,
                 temperature: float, top_p: float):
    """One token for every row: forward on the last token, pick, stop check. Compiled as one graph."""
    out = model(input_ids=tok_B1, position_ids=pos_B1, attention_mask=mask_BL, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    nxt_B = pick_tokens(out.logits[:, -1], temperature, top_p)
    nxt_B = torch.where(done_B, torch.full_like(nxt_B, pad_id), nxt_B)
    return nxt_B, done_B | torch.isin(nxt_B, eos_E)


def _cache_kwarg(model) -> str:
    """The name under which this model's forward takes its KV cache: ``cache`` from transformers 5.2x,
    ``past_key_values`` before (and in many remote-code models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _new_cache(model, batch: int, length: int, dtype: torch.dtype, device: torch.device):
    from transformers import StaticCache

    class CastingStaticCache(StaticCache):
        """A static cache that stores key and value states in its own dtype, whatever the model hands it
        (under autocast with fp32 weights, keys leave the rotary embedding in fp32, values in bf16)."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx]
            return super().update(key_states.to(layer.keys.dtype), value_states.to(layer.values.dtype), layer_idx,
                                  *args, **kwargs)

    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = CastingStaticCache(config=model.config, max_cache_len=length)
    cache.early_initialization(batch, heads, head_dim, dtype, device)  # the engine allocates, never transformers
    return cache


def _cause(e: BaseException) -> str:
    """A compile failure in one line: the innermost cause's type and first line (dynamo wraps a backend's
    error in BackendCompilerFailed, whose own first line names only the backend)."""
    root = e
    for _ in range(8):
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None or inner is root:
            break
        root = inner
    text = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    outer = "" if root is e else f"{type(e).__name__}: "
    return (f"{outer}{type(root).__name__}" + (f": {text}" if text else ""))[:300]


def _is_sharded(model) -> bool:
    """FSDP2 modules run through their own hooks: decoding them stays eager."""
    return any(hasattr(m, "unshard") and hasattr(m, "reshard") for m in model.modules())


class DecodeEngine:
    """Batched generation from token ids for one causal LM; see the module docstring.

    ``compile``: ``auto`` (``reduce-overhead`` on CUDA, eager elsewhere), ``off``, or a
    ``torch.compile`` mode. ``backend`` is torch.compile's, a name or a callable (tests use ``aot_eager``
    on CPU). ``stats`` counts prefills, decode steps and the distinct compiled shapes.
    ``compile_fallback``: None, or why compiling failed and the engine decodes eagerly.
    """

    def __init__(self, model, *, pad_id: int, eos_ids, compile: str = "auto", backend: str | Callable = "inductor",
                 min_length: int = 256, sync_every: int | None = None, keep_caches: int = 2):
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        self.model = model
        self.pad_id = int(pad_id)
        self.eos_ids = sorted({int(e) for e in eos_ids if e is not None})
        self.compile = compile
        self.backend = backend
        self.min_length = min_length
        self.sync_every = sync_every
        self.keep_caches = keep_caches
        self._caches: dict[tuple, object] = {}  # (B, L, dtype, device) -> cache, most recent last
        self._step = None
        self.compile_fallback: str | None = None
        self._cache_kw = _cache_kwarg(model)
        self.stats = {"prefills": 0, "decode_steps": 0, "compiled_shapes": set()}

    # --- settings resolved per call -----------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype decoding computes in: autocast's where it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def compiling(self, device: torch.device) -> bool:
        if self.compile == "off" or (self.compile == "auto" and device.type != "cuda") or self.compile_fallback:
            return False
        return not _is_sharded(self.model)

    def _compiled_step(self):
        if self._step is None:
            import torch._dynamo

            mode = "reduce-overhead" if self.compile == "auto" else self.compile
            # every (batch, cache length) bucket is its own graph: allow more than dynamo's default 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._step = torch.compile(_decode_step, mode=mode if self.backend == "inductor" else None,
                                       backend=self.backend, dynamic=False)
        return self._step

    def _step_compiled_or_eager(self, *args):
        """The compiled step; if it fails (compilation happens at a shape's first call, CUDA-graph capture
        at a later one), the same step eagerly, and eager decoding from then on."""
        if self.compile_fallback is None:
            if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs were copied out
            try:
                return self._compiled_step()(*args)
            except Exception as e:  # noqa: BLE001 - any compile failure; a real error raises again eagerly below
                global _fallback_warned
                self.compile_fallback = _cause(e)
                if not _fallback_warned:
                    _fallback_warned = True
                    log.warning("compiling the decode step failed (%s); decoding eagerly from now on (the same "
                                "tokens, slower)", self.compile_fallback)
        return _decode_step(*args)

    def _cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device):
        key = (batch, length, dtype, device)
        cache = self._caches.pop(key, None)
        if cache is None:
            while len(self._caches) >= self.keep_caches:  # oldest first: a shape not seen lately frees its memory
                self._caches.pop(next(iter(self._caches)))
            cache = _new_cache(self.model, batch, length, dtype, device)
        else:
            cache.reset()  # same tensors (static addresses): the compiled graph of this shape is reused
        self._caches[key] = cache
        return cache

    # --- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 batch_bucket: int | None = None, stop: Sequence[str] | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> Generation:
        """Continue every prompt (token ids, no padding) by up to ``max_new_tokens`` tokens.

        ``batch_bucket``: when compiling, rows are padded up to it (a caller with a fixed batch size
        passes it, so a short last batch reuses the graph of the full ones); default a power of two.
        ``stop``: strings that end a row once its text (``decode`` of its generated tokens, the caller's
        own decoding) holds one whose first occurrence is final (``first_stop_is_final``), checked every
        ``sync_every`` steps; the caller cuts the text at the first stop string, and greedy rows give
        the cut text of decoding without stop strings. Sampled rows draw as they would, but a call that
        ends earlier leaves the RNG elsewhere for the next one.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no empty prompt")
        stops = [s for s in ([stop] if isinstance(stop, str) else stop or ()) if s]
        if stops and decode is None:
            raise ValueError("generate: stop strings need decode, the caller's text of a row's token ids")
        device = self._device()
        compiled = self.compiling(device)
        n_real, N = len(prompts), max_new_tokens
        P = max(len(p) for p in prompts)
        if compiled:  # fixed shapes: every batch of a bucket runs the same graph
            B = max(batch_bucket or 0, _pow2(n_real))
            L = max(_pow2(P + N), self.min_length)
            limit = context_length(self.model)
            if limit and L > limit >= P + N:
                L = P + N
            prompts = prompts + [prompts[0]] * (B - n_real)  # filler rows, dropped at the end
        else:
            B, L = n_real, P + N
        dtype = self.compute_dtype(device)

        # --- left-padded prompts (B, P) and the mask of the whole cache (B, L)
        ids_BP, mask_BP, pos_BP = pad_left(prompts, self.pad_id)
        mask_BL = torch.zeros((B, L), dtype=torch.long)
        mask_BL[:, :P] = mask_BP
        mask_BL[:, P:P + N] = 1  # generated positions; the causal mask hides those not yet written
        ids_BP, mask_BL, pos_BP = ids_BP.to(device), mask_BL.to(device), pos_BP.to(device)
        eos_E = torch.tensor(self.eos_ids, dtype=torch.long, device=device)

        cache = self._cache(B, L, dtype, device)
        out_BN = torch.full((B, N), self.pad_id, dtype=torch.long, device=device)
        with self._attention_backends(device), eval_mode(self.model):
            # --- prefill (eager: one call per batch, its shape varies with the prompts)
            logits = self.model(input_ids=ids_BP, attention_mask=mask_BL,
                                position_ids=pos_BP, use_cache=True, logits_to_keep=1,
                                **{self._cache_kw: cache}).logits[:, -1]  # (B, V)
            self.stats["prefills"] += 1
            tok_B = pick_tokens(logits, temperature, top_p)
            done_B = torch.isin(tok_B, eos_E)
            done_B[n_real:] = True  # filler rows: their tokens are dropped, they never keep the loop running
            out_BN[:, 0] = tok_B
            # --- decode, one token per step
            step = self._step_compiled_or_eager if compiled else _decode_step
            if compiled:
                self.stats["compiled_shapes"].add((B, L, str(dtype), temperature > 0, top_p < 1))
            sync_every = self.sync_every or (16 if device.type == "cuda" else 1)
            tok_B1 = tok_B.unsqueeze(1).clone()
            pos_B1 = pos_BP[:, -1:] + 1  # (B, 1)
            made_B = [N] * B  # tokens each row made: fewer where a stop string ended it
            window = sync_every + max(map(len, stops), default=0) + STOP_LOOKAHEAD + STOP_WINDOW_MARGIN
            for t in range(1, N):
                if (t - 1) % sync_every == 0:  # the only host synchronisation
                    if stops:
                        done_B, finished = self._stop_on_strings(out_BN, t, done_B, stops, decode, window, made_B)
                    else:
                        finished = bool(done_B.all())
                    if finished:
                        break
                nxt_B, now_done_B = step(self.model, self._cache_kw, cache, tok_B1, pos_B1, mask_BL, done_B, eos_E,
                                         self.pad_id, temperature, top_p)
                out_BN[:, t] = nxt_B
                tok_B1 = nxt_B.unsqueeze(1).clone()
                done_B = now_done_B.clone()
                pos_B1 = pos_B1 + 1
                self.stats["decode_steps"] += 1
        tokens_BN = out_BN[:n_real].cpu()
        made_B = torch.tensor(made_B[:n_real])  # (B,)
        on_stop_B = made_B < N
        mask_BN = end_mask(tokens_BN, self.eos_ids) & (torch.arange(N) < made_B[:, None])  # pad_id may be an end id
        return Generation(tokens_BN, mask_BN, torch.isin(tokens_BN, eos_E.cpu()).any(dim=1) | on_stop_B, on_stop_B)

    @staticmethod
    def _stop_on_strings(out_BN, t: int, done_B, stops: list[str], decode, window: int, made_B: list[int]):
        """At a synchronisation point, before step ``t``: the rows not done whose text holds a final stop
        string are done from now on (``made_B`` records their ``t`` tokens). A row's last ``window`` tokens
        are decoded first (cheap; a stop string that the window misses only costs steps), its whole text
        only where they hold a stop string. Returns done_B and whether every row is done."""
        rows = torch.cat([done_B[:, None].long(), out_BN[:, max(0, t - window):t]], dim=1).tolist()  # one copy
        done = [bool(r[0]) for r in rows]
        newly = [i for i, r in enumerate(rows) if not done[i] and any(s in decode(r[1:]) for s in stops)
                 and first_stop_is_final(decode(out_BN[i, :t].tolist()), stops)]
        for i in newly:
            done[i], made_B[i] = True, t
        if newly:  # a value change of the step's input: the compiled graph replays as before
            done_B = torch.tensor(done, device=done_B.device)
        return done_B, all(done)

    def _attention_backends(self, device: torch.device):
        """On CUDA, SDPA without the cuDNN backend: it costs ~1.5 ms of CPU per call for a decode-sized
        problem (../shared/gpu/README.md), more than the whole step's GPU work."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


_ENGINES: "weakref.WeakKeyDictionary[torch.nn.Module, DecodeEngine]" = weakref.WeakKeyDictionary()


def compile_fallback_of(model) -> str | None:
    """Why the shared engine of ``model`` stopped compiling its decode step (None: it did not)."""
    engine = _ENGINES.get(model)
    return engine.compile_fallback if engine is not None else None


def engine_for(model, *, pad_id: int, eos_ids, compile: str = "auto") -> DecodeEngine:
    """The engine of ``model``, shared by every caller that decodes with it (the student's rollouts, a
    local generator), so that its caches and compiled graphs are made once per model."""
    engine = _ENGINES.get(model)
    eos = sorted({int(e) for e in eos_ids if e is not None})
    if engine is None or (engine.pad_id, engine.eos_ids, engine.compile) != (int(pad_id), eos, compile):
        engine = _ENGINES[model] = DecodeEngine(model, pad_id=pad_id, eos_ids=eos_ids, compile=compile)
    return engine
