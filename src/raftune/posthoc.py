"""Post-hoc baselines applied to a fine-tuned model: FAPM pruning of the task vector and WiSE-FT.

    raftune fapm --base default --tuned runs/train-<hash>/model --keep 0.1 --out runs/fapm-sft
    raftune wise --base default --tuned runs/train-<hash>/model --alpha 0.25 --alpha 0.5 --out runs/wise-sft

Both work on dW = W_ft - W_0, parameter by parameter. FAPM (forgetting-aware pruning, Huang et al.,
EMNLP 2025) keeps the entries of dW with the highest S = |dW| - mean(|W_0|) * |dW| / |W_0|: a change
that is large next to the weight it moves is the one that makes the model forget, so it is penalised.
WiSE-FT (Wortsman et al.) interpolates: W = (1 - a) W_0 + a W_ft.

``tuned`` is a folder the trainer wrote: a full model, or a LoRA adapter (merged onto ``base`` here).
Both models are loaded in fp32 on CPU, and the result is saved as a full fp32 model with a
``raftune.json`` saying how it was made.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from raftune import outputs
from raftune.files import atomic_write_json, stable_hash

log = logging.getLogger("raftune.posthoc")


# --- tensor functions ---------------------------------------------------------------------------------


def fapm_scores(w0: torch.Tensor, w_ft: torch.Tensor) -> torch.Tensor:
    """S = |dW| - lam * |dW| / |W_0| with lam = mean(|W_0|), the shape of ``w0``; -inf where W_0 = 0.

    A change of a zero weight is infinitely large relative to it, so it ranks last; computing that
    with a division would give NaN where dW is zero too.
    """
    abs_w0, abs_dw = w0.abs(), (w_ft - w0).abs()
    lam = abs_w0.mean()
    safe_w0 = torch.where(abs_w0 > 0, abs_w0, torch.ones_like(abs_w0))  # no 0/0 even in the discarded branch
    return torch.where(abs_w0 > 0, abs_dw - lam * abs_dw / safe_w0, torch.full_like(abs_dw, -math.inf))


def fapm_tensor(w0: torch.Tensor, w_ft: torch.Tensor, keep: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, mask): W = W_0 + mask * dW, where mask marks the ceil(keep * numel) entries of highest S.

    Entries that tie at the k-th score are chosen in ``torch.topk``'s order. A tensor with dW = 0
    everywhere comes back as W_0 with an empty mask. W takes W_ft's values where kept (not W_0 + dW,
    which rounds), so keep=1 gives W_ft exactly.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if not torch.any(w_ft != w0):
        return w0.clone(), torch.zeros_like(w0, dtype=torch.bool)
    s_flat = fapm_scores(w0, w_ft).reshape(-1)  # (numel,)
    k = max(1, math.ceil(keep * s_flat.numel()))
    mask = torch.zeros_like(s_flat, dtype=torch.bool)
    mask[torch.topk(s_flat, k, sorted=False).indices] = True
    mask = mask.reshape(w0.shape)
    return torch.where(mask, w_ft, w0), mask


def wise_tensor(w0: torch.Tensor, w_ft: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * W_0 + alpha * W_ft; exactly W_0 at alpha=0 and W_ft at alpha=1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * w0 + alpha * w_ft


# --- model folders ------------------------------------------------------------------------------------


def _load_pair(base: str, tuned: str):
    """(base model, tuned model with any LoRA adapter merged, tokenizer to save, tuned is an adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raftune.models import load_model_and_tokenizer

    folder = Path(tuned).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{tuned}: no such folder (--tuned takes the model folder a `raftune train` run wrote)")
    adapter = (folder / "adapter_config.json").exists()
    if not adapter and not (folder / "config.json").exists():
        raise ValueError(f"{tuned}: neither a model folder (config.json) nor a LoRA adapter (adapter_config.json)")
    meta = folder / "raftune.json"
    said = json.loads(meta.read_text()).get("base_model") if meta.exists() else None
    if said is not None and said != base:  # a task vector against the wrong base is noise, but a path may alias
        log.warning("%s was trained from %s; the base given is %s", tuned, said, base)
    base_model, tok = load_model_and_tokenizer(base, device="cpu", dtype="fp32")
    if adapter:
        from peft import PeftModel

        tuned_model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder)).merge_and_unload()
    else:
        tuned_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if (folder / "tokenizer_config.json").exists():  # the trainer saves the tokenizer it trained with
        tok = AutoTokenizer.from_pretrained(str(folder))
    return base_model, tuned_model, tok, adapter


def _matched_params(base_model, tuned_model, base: str, tuned: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(base parameter, tuned parameter) pairs by name. named_parameters lists a tied weight once, so a
    tied lm_head is merged once and stays tied; a model tied on one side only differs in names."""
    b, t = dict(base_model.named_parameters()), dict(tuned_model.named_parameters())
    only_b, only_t = sorted(b.keys() - t.keys()), sorted(t.keys() - b.keys())
    shapes = [f"{n} {tuple(b[n].shape)} vs {tuple(t[n].shape)}" for n in b.keys() & t.keys() if b[n].shape != t[n].shape]
    if only_b or only_t or shapes:
        raise ValueError(f"{base} and {tuned} do not hold the same parameters: only in base {only_b[:5]}, "
                         f"only in tuned {only_t[:5]}, shapes differ {sorted(shapes)[:5]}")
    return [(b[n], t[n]) for n in b]


def _save(model, tok, out: Path, meta: dict, key: str) -> Path:
    """Write the model folder under a temporary name and rename it, so a killed run leaves no half model.
    Only a folder ``outputs.claim`` allowed (none, an empty one, or this kind's own output) is replaced."""
    outputs.claim(out, meta["method"], key, other_key="redo", create=False)  # checked again: it may have appeared since
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its folder is private (0700), and it becomes the model folder
    try:
        model.config.use_cache = True
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "raftune.json", meta)
        outputs.write_manifest(tmp, meta["method"], key, _describe(meta), complete=True)
        if out.exists():  # os.replace cannot replace a non-empty folder: move the old one aside first
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / out.name)
            shutil.rmtree(old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _describe(meta: dict) -> str:
    return ", ".join(f"{k} {meta[k]}" for k in ("method", "keep", "alpha", "tuned_model", "base_model") if k in meta)


@torch.no_grad()
def _apply(base: str, tuned: str, outs: list[tuple[Path, dict, Callable]]) -> list[Path]:
    """For each (folder, raftune.json fields, fn): base parameters set to fn(W_0, W_ft), then saved.
    fn returns (W, entries kept or None). An output folder already holding this very result (same
    settings, same base and tuned content) is kept as it is; one that holds anything but this kind of
    output is refused before any model loads."""
    made_of = {"base": outputs.model_fingerprint(base), "tuned": outputs.model_fingerprint(tuned)}
    keys = [stable_hash({**made_of, **fields}, 16) for _, fields, _ in outs]
    claims = [outputs.claim(Path(out), fields["method"], key, other_key="redo", create=False)
              for (out, fields, _), key in zip(outs, keys)]
    if all(c.same and c.complete for c in claims):
        for c in claims:
            log.info("%s already holds this %s model (same settings, base and tuned model): kept", c.path, c.kind)
        return [c.path for c in claims]
    base_model, tuned_model, tok, adapter = _load_pair(base, tuned)
    pairs = _matched_params(base_model, tuned_model, base, tuned)
    tuned_buffers = dict(tuned_model.named_buffers())
    for name, buf in base_model.named_buffers():  # not trained (rotary tables, counters): the tuned model's
        if name in tuned_buffers:
            buf.copy_(tuned_buffers[name])
    w0s = [w0.detach().clone() for w0, _ in pairs] if len(outs) > 1 else [w0.detach() for w0, _ in pairs]
    written = []
    for (out, fields, fn), key in zip(outs, keys):
        kept = total = 0
        for (param, w_ft), w0 in zip(pairs, w0s):
            w, n_kept = fn(w0, w_ft)
            param.copy_(w)  # in place: a tied embedding and lm_head share this one tensor
            kept, total = kept + (n_kept or 0), total + w0.numel()
        meta = {"method": fields["method"], "base_model": base, "tuned_model": tuned, "tuned_lora": adapter, **fields}
        if fields["method"] == "fapm":
            meta["kept_fraction"] = kept / total
        written.append(_save(base_model, tok, Path(out), meta, key))
    return written


def fapm(base: str, tuned: str, out: str, keep: float = 0.1) -> Path:
    """FAPM of ``tuned`` against ``base``, keeping a ``keep`` fraction of each parameter's dW; saved to ``out``.

    raftune.json's kept_fraction is the share of all parameter entries that take the tuned value
    (the masks' entries; a parameter with dW = 0 everywhere counts none)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")

    def fn(w0, w_ft):
        w, mask = fapm_tensor(w0, w_ft, keep)
        return w, int(mask.sum())

    return _apply(base, tuned, [(Path(out), {"method": "fapm", "keep": keep}, fn)])[0]


def wise(base: str, tuned: str, out: str, alphas: Sequence[float]) -> list[Path]:
    """WiSE-FT of ``tuned`` and ``base`` at each alpha, saved to ``out/wise-<alpha>`` (one folder per
    alpha, a single alpha too, so scripts find the models in one place whatever they asked for)."""
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"alphas must be one or more values in [0, 1], got {list(alphas)}")
    outs = [(Path(out) / f"wise-{a:g}", {"method": "wise", "alpha": a},
             lambda w0, w_ft, a=a: (wise_tensor(w0, w_ft, a), None)) for a in dict.fromkeys(alphas)]
    return _apply(base, tuned, outs)
