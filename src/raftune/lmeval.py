"""lm-evaluation-harness tasks as a raftune suite, and raftune's model inside lm-eval.

    raftune eval --model runs/train-raft-<hash>/model --suite lm-eval --lm-eval-task arc_easy --lm-eval-task gsm8k
    raftune eval --model default --suite lm-eval --lm-eval-include-path my_tasks --lm-eval-task my_mmlu --lm-eval-limit 100
    raftune-lm-eval --model raftune --model_args pretrained=default,dtype=fp32 --tasks my_mmlu --include_path my_tasks

``raftune-lm-eval`` (or ``python -m raftune.lmeval``) is lm-eval's own command line with raftune's model
registered: lm-eval 0.4.13 finds models only in its registry (no plugin entry points), so the model has to
be imported before its CLI parses ``--model``; every other flag is lm-eval's.

``RaftuneLM`` is an lm-eval ``TemplateLM`` registered as ``raftune``, backed by raftune's own pieces:

- ``generate_until`` decodes through raftune's ``DecodeEngine``: requests grouped by their generation
  settings, sorted by prompt length (longest first) and run ``batch_size`` at a time (on CUDA the engine
  buckets batch and cache length, so its compiled graphs are reused); greedy, or sampled with the
  request's ``temperature`` and ``top_p``; at most ``max_gen_toks`` new tokens; decoding ends at the
  model's end-of-turn token or, as the ``hf`` backend's, soon after an ``until`` string (the engine's stop
  strings), and the text is cut at the first of the request's ``until`` strings (the end-of-text token's
  string included, as lm-eval's ``hf`` backend does). A generation setting the
  engine does not have (``top_k``, ``num_beams``, ``repetition_penalty``) is an error, never ignored.
- ``loglikelihood`` and ``loglikelihood_rolling`` run batched forwards: input rows sorted by length and
  left-padded (with position ids), requests that share an input row (the one-token answers of a
  multiple-choice question) share its forward, and logits are made only for the scored positions
  (``logits_to_keep``); a forward holds at most ``LOGITS_BUDGET`` logits, so long windows go a few rows
  at a time. Rolling windows are lm-eval's own (``get_rolling_token_windows``, context 1).
- ``apply_chat_template`` renders the tokenizer's chat template.

Token ids are those of lm-eval's ``hf`` backend (the same task gives the same requests the same ids:
a context's trailing spaces move to the continuation, which is the tail of the whole text's encoding)
with raftune's one rule added, text from data is text: a special-token string in a task's text
(``<|im_end|>`` in a question) stays those characters, never a control token. Plain prompts are
encoded with ``split_special_tokens``; chat prompts mark the special-token strings inside message
contents (and inside a continuation) as transformers' ``sanitize_control_tokens`` does, so only the
template's own markup is special. Where no such string occurs, the ids are the ``hf`` backend's.

Every request's answer is logged as it is made (``request_log``, a JSONL file keyed by a hash of the
model's content, dtype, context length and the request), in slices of a few batches: a stopped
evaluation asks only what the log lacks (sampled generations included: a logged one keeps its text).

The suite (``run_suite``): the tasks by name (lm-eval's, or the user's from ``include_path``), each
task's few-shot count or ``num_fewshot``, ``limit`` documents per task, the chat template on for a
tokenizer that has one; lm-eval's metric names and standard errors per task in the summary, its logged
samples as rows. Nothing is downloaded: when the Hugging Face hub cannot be reached, hub and datasets
offline mode are switched on first, so a hub task fails at once with one line naming it (a local task
reads its files), and lm-eval's IFEval checkers find NLTK's Punkt data in raftune's cache
(``raftune.ifeval.punkt_tab_nltk_dir``), never through ``nltk.download``.

Task folders are code: lm-eval's YAML may name Python (``!function module.fn``) and its Jinja prompt
templates are rendered without a sandbox. ``check_task_folder`` refuses a folder whose YAMLs name
Python outside lm-eval's installed package unless ``trust_code`` is set; that stops the obvious
Python, it is no sandbox: pass only folders you trust.
"""
from __future__ import annotations

if __name__ == "__main__":  # `python -m raftune.lmeval`: run it as the package module, registered once
    import sys

    import raftune.lmeval

    sys.exit(raftune.lmeval.main())

import hashlib
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

try:
    import lm_eval
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models, which get_model skips once ours is there
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra
    raise ImportError(f"the lm-eval suite needs lm-evaluation-harness ({e}): pip install 'raftune[lm-eval]'") from None

import torch
import yaml

from raftune.files import append_jsonl, read_jsonl_log, stable_hash
from raftune.models import context_length, eval_mode
from raftune.sequences import pad_left, special_strings, text_ids, warn_special_text

log = logging.getLogger("raftune.lmeval")

LOGITS_BUDGET = 1 << 27  # logits per forward (B x kept positions x V): 512 MiB in fp32
LOG_SLICE_BATCHES = 4  # requests are answered and logged in slices of this many batches
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf backend's, for a task that sets none
DEFAULT_MAX_LENGTH = 2048  # where a model's config names no context length (lm-eval's default too)
# the generation settings the engine honours (normalize_gen_kwargs gives these names)
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}
LOCAL_DATASETS = {"json", "csv", "parquet", "text", "arrow"}  # datasets' builders that read files
_MARKER = "\U000f0000"  # what transformers' mark_control_tokens puts before a special-token string it keeps as text


# --- resuming: every answer logged as made ------------------------------------------------------------

class RequestLog:
    """Answers of lm-eval requests, appended to a JSONL file as they are made and served when asked again.
    Keys hash ``identity`` (what answers: the model's content and the settings that change an answer), the
    request kind and its arguments."""

    def __init__(self, path: str | Path | None, identity):
        self.path = Path(path) if path is not None else None
        self.identity = identity
        self.entries: dict[str, object] = {}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.entries = {r["key"]: r["value"] for r in read_jsonl_log(self.path)}

    def key(self, kind: str, args) -> str:
        """The log key of one request of ``kind`` with lm-eval's ``args``."""
        return stable_hash([self.identity, kind, list(args)], 32)

    def add(self, entries: dict[str, object]) -> None:
        """Log ``entries`` (key -> answer) in one fsynced append."""
        if self.path is not None:
            append_jsonl(self.path, [{"key": k, "value": v} for k, v in entries.items()])
        self.entries.update(entries)


# --- the model ---------------------------------------------------------------------------------------

def _progress(what: str, total: int, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not enabled)
    return bar, bar.add_task(what, total=total)


@register_model("raftune")
class RaftuneLM(TemplateLM):
    """lm-eval's model interface over a raftune local model (see the module docstring).

    ``lm_eval --model raftune --model_args pretrained=default,dtype=fp32,batch_size=16`` builds one from a
    model spec (anything ``raftune eval --model`` takes but a server); ``RaftuneLM.from_generator`` wraps a
    model raftune has open. ``max_length`` overrides the context length; ``max_gen_toks`` is the default
    for tasks that set none; ``compile`` is the engine's; ``request_log`` a JSONL file for resuming.
    """

    def __init__(self, pretrained: str = "default", dtype: str | None = None, device: str | None = None,
                 batch_size: int | str | None = 16, max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, compile: str = "auto", request_log: str | None = None,
                 progress: bool = True, _generator=None, _identity: str | None = None):
        super().__init__()
        from raftune.generation import is_remote_spec, open_generator
        from raftune.outputs import model_fingerprint

        batch_size = _batch_size(batch_size)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s: CUDA is not available here; the model goes where raftune picks (cpu)", device)
            device = None  # lm-eval's command line says cuda:0 unless told otherwise
        if _generator is None:
            if is_remote_spec(str(pretrained)):
                raise ValueError(f"{pretrained}: lm-eval's requests need the model's log-likelihoods and tokens; "
                                 "pass a local model (a folder, a .gguf, a hub id or 'default'), not a server")
            _generator = open_generator(str(pretrained), batch_size=batch_size, device=device, dtype=dtype,
                                        compile=compile)
            _identity = model_fingerprint(str(pretrained))
        self.gen = _generator
        self.model = _generator.model
        self.tokenizer = _generator.tokenizer
        self.engine = _generator.engine
        self._batch_size = batch_size
        self._max_length = max_length or context_length(self.model) or DEFAULT_MAX_LENGTH
        self._max_gen_toks = max_gen_toks
        self.progress = progress
        dtype_name = str(next(p.dtype for p in self.model.parameters() if p.is_floating_point()))
        self.requests = RequestLog(request_log, {"model": _identity or _generator.name, "dtype": dtype_name,
                                                 "max_length": self._max_length, "max_gen_toks": max_gen_toks})
        self.stats = {"asked": 0, "reused": 0, "truncated_contexts": 0, "special_token_text": 0}
        self._rendered: set[bytes] = set()  # digests of the chat prompts apply_chat_template made
        self._control = _control_token_regex(self.tokenizer)

    @classmethod
    def from_generator(cls, generator, *, identity: str | None = None, request_log: str | Path | None = None,
                       max_length: int | None = None, progress: bool = True) -> "RaftuneLM":
        """The model of an open raftune ``LocalGenerator`` (or a ``CachedGenerator`` over one), its batch size
        kept; ``identity`` keys the request log (the model's content fingerprint)."""
        inner = getattr(generator, "inner", generator)
        return cls(batch_size=inner.batch_size, max_length=max_length, request_log=request_log, progress=progress,
                   _generator=inner, _identity=identity)

    # --- what lm-eval reads ---------------------------------------------------------------------------

    # lm-eval's interface, valued as its hf backend values them
    @property
    def eot_token_id(self) -> int:
        """The end-of-text token: the tokenizer's EOS."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """Positions per forward: the model's context, unless ``max_length`` was given."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """New tokens for a generative task that sets no ``max_gen_toks``."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Rows per forward and per engine call."""
        return self._batch_size

    @property
    def device(self):
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name, as lm-eval keys its caches."""
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        """What lm-eval records of the model in its results."""
        return {"model_name": self.gen.name, "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype)}

    # --- text to ids ----------------------------------------------------------------------------------

    def _mark(self, text: str) -> str:
        """``text`` with its special-token strings marked as text, for a string that goes into a chat prompt."""
        from transformers.utils.chat_template_utils import mark_control_tokens

        return mark_control_tokens(text, self._control)

    def _holds_special_text(self, request) -> bool:
        """Whether a request's data text holds special-token strings (in a chat prompt: the ones ``_mark`` marked)."""
        texts = [a for a in request.args if isinstance(a, str)]
        if texts and self._is_chat(texts[0]):
            return any(_MARKER in t for t in texts) or any(self._control.search(t) for t in texts[1:])
        return any(self._control.search(t) for t in texts)

    def _is_chat(self, text: str) -> bool:
        return hashlib.sha1(text.encode("utf-8")).digest() in self._rendered

    def _encode(self, text: str, chat: bool, add_special_tokens: bool | None = None) -> list[int]:
        if chat:  # the template's markup is special; what _mark marked inside it is text
            from transformers.utils.chat_template_utils import encode_marked_chat

            return encode_marked_chat(self.tokenizer, text)
        return text_ids(self.tokenizer, text, add_special_tokens=True if add_special_tokens is None else add_special_tokens)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The ids of ``string``: a chat prompt this model rendered keeps its markup; any other text is text."""
        return self._encode(string, self._is_chat(string), add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        """Text of ``tokens``, special tokens left out (as the hf backend decodes generations)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context go to the continuation, whose ids are the tail of the
        whole text's; in a chat prompt the continuation's special-token strings are marked as text."""
        chat = self._is_chat(context)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if chat:
            continuation = self._mark(continuation)
        whole = self._encode(context + continuation, chat)
        head = self._encode(context, chat)
        return head, whole[len(head):]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template over ``chat_history``, the contents' special-token strings marked as text
        (``add_generation_prompt=False`` continues the last, assistant message, as lm-eval's hf backend does)."""
        import jinja2

        marked = [{**m, "content": self._mark(m["content"])} if isinstance(m.get("content"), str) else m
                  for m in chat_history]
        kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                  continue_final_message=not add_generation_prompt)
        try:
            text = self.tokenizer.apply_chat_template(marked, **kw)
        except jinja2.exceptions.TemplateError:  # templates without a system role: as the hf backend, drop it
            log.warning("the chat template refused the conversation; trying again without its system message")
            text = self.tokenizer.apply_chat_template([m for m in marked if m["role"] != "system"], **kw)
        self._rendered.add(hashlib.sha1(text.encode("utf-8")).digest())
        return text

    # --- requests, logged -----------------------------------------------------------------------------

    def _answered(self, kind: str, requests, compute, sort_key) -> list:
        """Answers of ``requests``: from the request log, the rest by ``compute`` in slices of a few batches
        (sorted by ``sort_key``, so a slice holds similar lengths), each slice logged once made."""
        keys = [self.requests.key(kind, r.args) for r in requests]
        self.stats["special_token_text"] += sum(map(self._holds_special_text, requests))
        out = [self.requests.entries.get(k) for k in keys]
        todo = sorted((i for i, v in enumerate(out) if v is None), key=lambda i: sort_key(requests[i].args))
        self.stats["reused"] += len(requests) - len(todo)
        self.stats["asked"] += len(todo)
        step = max(1, self.batch_size * LOG_SLICE_BATCHES)
        bar, task = _progress(f"lm-eval {kind}", len(todo), self.progress and bool(todo))
        with bar:
            for s in range(0, len(todo), step):
                idx = todo[s : s + step]
                answers = compute([requests[i] for i in idx])
                for i, a in zip(idx, answers):
                    out[i] = list(a) if isinstance(a, tuple) else a
                    self.cache_hook.add_partial(kind, requests[i].args, a)
                self.requests.add({keys[i]: out[i] for i in idx})
                bar.update(task, advance=len(idx))
        if kind == "loglikelihood":
            return [(float(v[0]), bool(v[1])) for v in out]
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether greedy decoding gives it) per request."""
        return self._answered("loglikelihood", requests, lambda rs: TemplateLM.loglikelihood(self, rs, True),
                              lambda a: (-(len(a[0]) + len(a[1])), a[0]))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, over lm-eval's rolling windows of the model's context."""
        return self._answered("loglikelihood_rolling", requests, self._rolling, lambda a: -len(a[0]))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context, decoded by the engine, cut at the first ``until`` string."""
        return self._answered("generate_until", requests, self._generate,
                              lambda a: (json.dumps(a[1], sort_keys=True, default=str), -len(a[0])))

    # --- log-likelihoods ------------------------------------------------------------------------------

    def _rolling(self, requests) -> list[float]:
        windows, owner = [], []
        for i, r in enumerate(requests):
            ids = self.tok_encode(r.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logp
        return totals

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each (key, context ids, continuation ids); see the module docstring."""
        rows: dict[tuple[int, ...], int] = {}  # input ids -> row
        of_row: list[list[int]] = []  # row -> its requests
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError("a loglikelihood request needs a context and a continuation of at least one token")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]  # too long: the context's start goes
            r = rows.setdefault(tuple(whole[:-1]), len(rows))
            if r == len(of_row):
                of_row.append([])
            of_row[r].append(i)
        inputs = list(rows)
        order = sorted(range(len(inputs)), key=lambda r: -len(inputs[r]))  # longest first: an OOM shows at once
        vocab = self.model.get_output_embeddings().weight.shape[0]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        device = self.device
        with eval_mode(self.model):
            s = 0
            while s < len(order):
                # as many rows as the batch size and the logits budget allow
                batch, keep = [], 1
                while s < len(order) and len(batch) < self.batch_size:
                    r = order[s]
                    k = max(keep, max(min(len(requests[i][2]), len(inputs[r])) for i in of_row[r]))
                    if batch and (len(batch) + 1) * k * vocab > LOGITS_BUDGET:
                        break
                    batch.append(r)
                    keep = k
                    s += 1
                # left-padded: every row's scored positions end at T
                ids_BT, mask_BT, pos_BT = pad_left([list(inputs[r]) for r in batch], self.tokenizer.pad_token_id or 0)
                logits_BKV = self.model(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device),
                                        position_ids=pos_BT.to(device), logits_to_keep=keep, use_cache=False).logits
                for b, r in enumerate(batch):
                    logp_KV = torch.log_softmax(logits_BKV[b].float(), dim=-1)  # (K, V)
                    for i in of_row[r]:
                        cont = list(requests[i][2])[-min(len(requests[i][2]), len(inputs[r])):]
                        target_C = torch.tensor(cont, device=logp_KV.device)
                        logp_CV = logp_KV[keep - len(cont):]  # position t predicts token t + 1
                        out[i] = (logp_CV.gather(-1, target_C[:, None]).sum().item(),
                                  bool((logp_CV.argmax(dim=-1) == target_C).all()))
        return out

    # --- generation -----------------------------------------------------------------------------------

    def _generate(self, requests) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for idx in groups.values():
            kw = dict(normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks))
            if unknown := sorted(set(kw) - GEN_KWARGS):
                tasks = sorted({str(requests[i].task_name) for i in idx})
                raise ValueError(f"lm-eval task(s) {', '.join(tasks)}: generation setting(s) {', '.join(unknown)} are "
                                 f"not supported by raftune's engine (it decodes greedily or samples with temperature "
                                 f"and top_p); pass gen_kwargs without them")
            until = handle_stop_sequences(kw.get("until"), eos=eos)
            max_gen = int(kw["max_gen_toks"])
            temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
            top_p = float(kw.get("top_p") or 1.0)
            room = self.max_length - max_gen
            if room < 1:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for a prompt in the model's {self.max_length} "
                                 "positions")
            prompts = {}
            for i in idx:
                ids = self.tok_encode(requests[i].args[0])
                if len(ids) > room:  # as the hf backend: the prompt keeps its last tokens
                    self.stats["truncated_contexts"] += 1
                    ids = ids[-room:]
                prompts[i] = ids
            order = sorted(idx, key=lambda i: -len(prompts[i]))
            for s in range(0, len(order), self.batch_size):
                batch = order[s : s + self.batch_size]
                gen = self.engine.generate([prompts[i] for i in batch], max_gen, temperature, top_p,
                                           batch_bucket=self.batch_size, stop=until, decode=self.tok_decode)
                for i, row, n in zip(batch, gen.tokens_BN.tolist(), gen.lengths_B.tolist()):
                    out[i] = postprocess_generated_text(self.tok_decode(row[:n]), until, None)
        if self.stats["truncated_contexts"]:
            log.warning("lm-eval: %d prompt(s) longer than the context minus max_gen_toks kept their last tokens",
                        self.stats["truncated_contexts"])
        return out


def _batch_size(value) -> int:
    """lm-eval passes ``batch_size`` as given on its command line: an int, a digit string, or "auto" (here the
    default: raftune's batch is what the engine buckets by)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 16
    n = int(value)
    if n < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return n


def _control_token_regex(tok) -> re.Pattern:
    """The strings a chat prompt must keep as text when data holds them: the tokenizer's special tokens and
    the other added tokens its chat template writes (as ``sanitize_control_tokens`` counts them)."""
    template = tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template or "")
    tokens = set(special_strings(tok)) | {t.content for t in tok.added_tokens_decoder.values()
                                          if t.content in template and not t.content.isspace()}
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")


# --- task folders: data, and the code they name -------------------------------------------------------

class TaskFolderError(ValueError):
    """A task folder raftune refuses; the message names the file and line."""


def _function_loader(found: list):
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # lm-eval's loader: safe YAML plus its !function tag, here recorded, never imported
        pass

    def function(loader, node):
        found.append((loader.construct_scalar(node), node.start_mark.line + 1))
        return None

    Loader.add_constructor("!function", function)
    return Loader


def _lm_eval_package() -> Path:
    return Path(lm_eval.__file__).resolve().parent


def _untrusted_functions(path: Path, seen: set[Path]) -> list[str]:
    """``file:line: !function target`` for each function a task YAML (and what it includes) names outside
    lm-eval's installed package, resolved as lm-eval does: a ``.py`` beside the YAML first, else a module."""
    path = path.resolve()
    package = _lm_eval_package()
    if path in seen or path.is_relative_to(package):
        return []
    seen.add(path)
    found: list = []
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_function_loader(found))  # noqa: S506 - safe + !function
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # lm-eval skips a YAML it cannot read, so it names no code either
    bad = []
    for target, line in found:
        module, _, _ = str(target).rpartition(".")
        beside = (path.parent / f"{module.replace('.', '/')}.py").resolve()
        if beside.exists():
            trusted = beside.is_relative_to(package)
        else:
            trusted = module == "lm_eval" or module.startswith("lm_eval.")
        if not trusted:
            bad.append(f"{path}:{line}: !function {target}")
    includes = cfg.get("include") if isinstance(cfg, dict) else None
    for inc in includes if isinstance(includes, list) else [includes] if includes else []:
        bad += _untrusted_functions(Path(inc) if Path(inc).is_absolute() else path.parent / str(inc), seen)
    return bad


def check_task_folder(include_path: str | Path, trust_code: bool) -> None:
    """Refuse ``include_path`` (raising ``TaskFolderError``) when it is no folder, or when its task YAMLs name
    Python outside lm-eval's package and ``trust_code`` is off."""
    folder = Path(include_path)
    if not folder.is_dir():
        raise TaskFolderError(f"{folder}: no such folder (lm_eval include_path: a folder of lm-eval task YAMLs)")
    if trust_code:
        return
    seen: set[Path] = set()
    bad = [b for p in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]) for b in _untrusted_functions(p, seen)]
    if bad:
        raise TaskFolderError(f"{bad[0]}: this task YAML names Python outside lm-eval's package (to be run on every "
                              f"document); {len(bad)} such reference(s) in {folder}. Task folders are code: pass "
                              f"lm_eval.trust_code (--lm-eval-trust-code) only for a folder you trust")


_MANAGERS: dict[tuple, object] = {}


def task_manager(include_path: str | None, tasks: Sequence[str]):
    """lm-eval's ``TaskManager``: over ``include_path`` alone when it defines every task asked for (lm-eval's
    own index of thousands of YAMLs takes seconds to build), else over both. One per process and folder content."""
    from lm_eval.tasks import TaskManager

    from raftune.outputs import data_fingerprint

    key = (str(Path(include_path).resolve()), data_fingerprint(include_path)) if include_path else None
    key = (key, tuple(tasks))
    if key not in _MANAGERS:
        manager = None
        if include_path:
            local = TaskManager(include_path=str(include_path), include_defaults=False)
            if all(_defined(local, t) for t in tasks):
                manager = local
        _MANAGERS[key] = manager or TaskManager(include_path=str(include_path) if include_path else None)
    return _MANAGERS[key]


def _defined(manager, name: str, depth: int = 0) -> bool:
    """Whether ``name`` and, for a group, every task it names are in ``manager``'s index."""
    entry = manager.task_index.get(name)
    if entry is None or depth > 16:
        return False
    children = (entry.cfg or {}).get("task") if entry.kind.name == "GROUP" else None
    if isinstance(children, str):
        children = [children]
    return all(_defined(manager, c, depth + 1) for c in children or [] if isinstance(c, str))


def check_tasks(include_path: str | None, tasks: Sequence[str], trust_code: bool) -> None:
    """Before any model loads: the folder is allowed (``check_task_folder``) and every task name is known."""
    if include_path is not None:
        check_task_folder(include_path, trust_code)
    manager = task_manager(include_path, tasks)
    for name in tasks:
        if manager.task_index.get(name) is None:
            import difflib

            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            where = f"lm-eval {lm_eval.__version__}'s tasks" + (f" or {include_path}" if include_path else "")
            raise ValueError(f"lm_eval.tasks: no task {name!r} in {where}" +
                             (f"; did you mean {', '.join(close)}?" if close else ""))


def _leaf_configs(manager, name: str, depth: int = 0) -> list[dict]:
    entry = manager.task_index.get(name)
    if entry is None or depth > 16:
        return []
    cfg = entry.cfg or {}
    if entry.kind.name in ("GROUP", "TAG"):
        children = cfg.get("task") or []
        names = [children] if isinstance(children, str) else children
        if entry.kind.name == "TAG":
            names = [n for n, e in manager.task_index.items() if name in getattr(e, "tags", set())]
        return [c for n in names for c in (_leaf_configs(manager, n, depth + 1) if isinstance(n, str) else [n])]
    return [cfg]


def task_inputs(include_path: str | None, tasks: Sequence[str]) -> dict:
    """The content of what the tasks read, for the evaluation's key: the task folder, each local data file or
    folder a task names (its ``dataset_kwargs.data_files``, or a ``dataset_path`` that is a folder), and lm-eval's
    version (its own tasks' definitions). A hub dataset is named, not hashed."""
    from raftune.outputs import data_fingerprint

    manager = task_manager(include_path, tasks)
    data = {}
    for name in tasks:
        for cfg in _leaf_configs(manager, name):
            path = str(cfg.get("dataset_path") or "")
            files = (cfg.get("dataset_kwargs") or {}).get("data_files")
            if path in LOCAL_DATASETS or Path(path).is_dir():
                listed = files.values() if isinstance(files, dict) else [files] if files else []
                for f in [x for v in listed for x in (v if isinstance(v, list) else [v])] + ([path] if Path(path).is_dir() else []):
                    data[str(f)] = data_fingerprint(str(f))
            elif path:
                data[f"hub:{path}"] = f"hub:{path}:{cfg.get('dataset_name')}"
    return {"lm_eval_version": lm_eval.__version__, "data": data,
            "include_path": data_fingerprint(include_path) if include_path else None}


# --- offline ------------------------------------------------------------------------------------------

def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout_s`` (False in offline mode)."""
    if _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE"):
        return False
    host = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    ok: list[bool] = []

    def connect():  # in a thread: a name lookup has no time-out of its own
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    return bool(ok)


def go_offline() -> None:
    """Hub and datasets offline mode for this process, so that nothing waits on a network that is not there."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at import: set where it is read
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def load_tasks(manager, tasks: Sequence[str], offline: bool) -> list:
    """lm-eval's Task and Group objects for ``tasks`` (their documents read now); a task whose data cannot be
    had is one line naming it."""
    built = []
    for name in tasks:
        try:
            loaded = manager.load([name])
        except Exception as e:  # noqa: BLE001 - datasets and lm-eval fail many ways; each is one line here
            cfgs = _leaf_configs(manager, name)
            hub = sorted({str(c.get("dataset_path")) for c in cfgs if c.get("dataset_path")
                          and c.get("dataset_path") not in LOCAL_DATASETS and not Path(str(c["dataset_path"])).is_dir()})
            cause = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            if hub and offline:
                raise ValueError(f"lm-eval task {name!r} reads its data from the Hugging Face hub ({', '.join(hub)}), "
                                 f"which cannot be reached (no network, or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set) "
                                 f"and is not in the local datasets cache; run it once where the hub is reachable, "
                                 f"or evaluate a local task (lm_eval.include_path, whose YAML reads files: "
                                 f"dataset_path: json with data_files) ({cause})") from None
            raise ValueError(f"lm-eval task {name!r} could not be loaded: {cause}") from None
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            built.extend(loaded["tasks"].values())
    return built


# --- the suite ----------------------------------------------------------------------------------------

def _json_safe(obj):
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable, ensure_ascii=False))


def _is_stderr(metric: str) -> bool:
    return metric.split(",")[0].endswith("_stderr")


def _flat_metrics(results: dict, higher: dict) -> dict:
    """``{"task/metric,filter": value}`` for every number lm-eval reports that is higher-is-better (what
    retention is taken of), stderrs and counts left out."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if _is_stderr(key) or "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if (higher.get(task) or {}).get(metric) is True:
                flat[f"{task}/{key}"] = value
    return flat


def run_suite(settings, generator, run: Path, *, identity: str | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Evaluate ``generator``'s model (a local raftune backend) on ``settings.tasks`` with lm-eval; returns
    (summary, rows). The summary holds lm-eval's results per task (``tasks``: metric,filter -> value, stderrs
    included), per group (``groups``), ``higher_is_better``, the documents evaluated (``n_samples``), shots,
    versions, and ``metrics``: the higher-is-better values flat, ``task/metric,filter``. Rows are lm-eval's
    logged samples, with ``task``. Requests are logged to ``run/lm-eval-requests.jsonl``."""
    from lm_eval import simple_evaluate

    from raftune.ifeval import punkt_tab_nltk_dir

    offline = not hub_reachable()
    if offline:
        go_offline()
    punkt_tab_nltk_dir()  # before lm-eval imports its IFEval checkers, which download punkt_tab if NLTK lacks it
    lm = RaftuneLM.from_generator(generator, identity=identity, request_log=run / "lm-eval-requests.jsonl",
                                  progress=progress)
    has_template = bool(getattr(lm.tokenizer, "chat_template", None))
    chat = has_template if settings.chat is None else settings.chat
    if chat and not has_template:
        raise ValueError(f"lm_eval.chat: the tokenizer of {generator.name} has no chat template; set chat to false")
    manager = task_manager(settings.include_path, settings.tasks)
    tasks = load_tasks(manager, settings.tasks, offline)
    multiturn = chat if settings.fewshot_as_multiturn is None else settings.fewshot_as_multiturn
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=settings.num_fewshot, limit=settings.limit,
                              bootstrap_iters=settings.bootstrap_iters, log_samples=True, apply_chat_template=chat,
                              fewshot_as_multiturn=multiturn, system_instruction=settings.system_instruction,
                              gen_kwargs=dict(settings.gen_kwargs) if isinstance(settings.gen_kwargs, dict) else settings.gen_kwargs,
                              task_manager=manager, confirm_run_unsafe_code=settings.trust_code)
    higher = results.get("higher_is_better", {})
    groups = set(results.get("groups", {}))
    def metrics(m: dict) -> dict:  # lm-eval's "metric,filter" keys (its name, alias and sample_len are elsewhere)
        return {k: v for k, v in m.items() if k not in ("alias", "name", "sample_len")}

    summary = {
        "tasks": _json_safe({t: metrics(m) for t, m in results["results"].items() if t not in groups}),
        "groups": _json_safe({g: metrics(m) for g, m in results.get("groups", {}).items()}),
        "higher_is_better": _json_safe(higher),
        "metrics": _json_safe(_flat_metrics(results["results"], higher)),
        "n_samples": _json_safe(results.get("n-samples", {})),
        "n_shot": _json_safe(results.get("n-shot", {})),
        "versions": _json_safe(results.get("versions", {})),
        "chat": chat, "num_fewshot": settings.num_fewshot, "limit": settings.limit,
        "lm_eval_version": lm_eval.__version__,
        "requests": {"asked": lm.stats["asked"], "reused": lm.stats["reused"]},
        "truncated_contexts": lm.stats["truncated_contexts"],
        "rows_with_special_token_text": lm.stats["special_token_text"],
    }
    rows = [{"task": task, **_json_safe(sample)} for task, samples in results.get("samples", {}).items()
            for sample in samples]
    warn_special_text(log, "eval lm-eval", lm.stats["special_token_text"], lm.stats["asked"])
    return summary, rows


def main(argv: Sequence[str] | None = None) -> int:
    """``raftune-lm-eval ...``: lm-eval's command line, with ``--model raftune`` available."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


__all__ = ["RaftuneLM", "RequestLog", "TaskFolderError", "check_task_folder", "check_tasks", "go_offline",
           "hub_reachable", "load_tasks", "main", "run_suite", "task_inputs", "task_manager"]
