"""Judge-free measures of forgetting: output drift on general prompts, and weight distance.

Drift: the base model answers general prompts greedily; on those answers we measure how far the tuned
model's next-token distributions moved from the base model's, KL(p_base || p_tuned) over the full
vocabulary per answer token, and the tuned model's perplexity on them (the base model's own
perplexity is the reference it starts from). Both are 0 / equal for an unchanged model and need no judge.

    prompts = load_general_prompts("../shared/data/mt_bench/question.jsonl")
    answers = base_answers(base, tok, prompts, max_new_tokens=256)
    report = drift(base, tuned, tok, prompts, answers)

Weight distance (paper Appendix A): ||W_ft - W_0|| / ||W_0|| per parameter tensor and its mean over
tensors (the paper reports RAFT 0.0458 vs SFT 0.0524 on SmolLM3-3B).

    result = weight_distance("runs/base-model", "runs/raft/final")
    plot_weight_distance(result, Path("runs/raft/weight_distance.png"), title="RAFT")
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from raftune import losses
from raftune.data import DataError, _json_rows, _jsonl_file, _type_name
from raftune.sequences import answer_batch, chat_prompt_ids, end_of_turn_id

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
    pad = tok.pad_token_id if tok.pad_token_id is not None else eot
    dev_b, dev_t = _device(base_model), _device(tuned_model)
    head_b, head_t = base_model.get_output_embeddings(), tuned_model.get_output_embeddings()
    modes = base_model.training, tuned_model.training
    base_model.eval()
    tuned_model.eval()
    per_prompt = []
    try:
        for s in range(0, len(prompts), batch_size):
            p_ids = [chat_prompt_ids(tok, q) for q in prompts[s : s + batch_size]]
            # no length cap: cutting answers would change what is measured
            ids, attn, labels, mask, _ = answer_batch(tok, p_ids, answers[s : s + batch_size], eot,
                                                      max_len=2**62, pad_id=pad)  # (B, T) each
            h_b = _final_hidden(base_model, ids.to(dev_b), attn.to(dev_b))  # (B, T, D)
            h_t = _final_hidden(tuned_model, ids.to(dev_t), attn.to(dev_t))  # (B, T, D)
            labels, mask = labels.to(dev_b), mask.to(dev_b)
            kl_BT = torch.zeros(mask.shape, dtype=torch.float64, device=dev_b)
            nll_t_BT, nll_b_BT = torch.zeros_like(kl_BT), torch.zeros_like(kl_BT)
            for c in range(0, ids.shape[1], chunk):
                sl = slice(c, c + chunk)
                z_b = head_b(h_b[:, sl])  # (B, c, V)
                z_t = head_t(h_t[:, sl]).to(dev_b)  # (B, c, V)
                # a KL is >= 0; fp32 rounding leaves about -1e-6 where the two models barely differ
                kl_BT[:, sl] = losses.full_kl(z_t, z_b, mask[:, sl], temperature=1.0, direction="forward").double().clamp_min(0)
                nll_t_BT[:, sl] = losses.token_ce(z_t, labels[:, sl], mask[:, sl]).double()
                nll_b_BT[:, sl] = losses.token_ce(z_b, labels[:, sl], mask[:, sl]).double()
            n_B = mask.sum(1)
            for kl, nt, nb, n in zip(kl_BT.sum(1).tolist(), nll_t_BT.sum(1).tolist(), nll_b_BT.sum(1).tolist(), n_B.tolist()):
                per_prompt.append({"kl": kl / n, "tuned_nll": nt / n, "base_nll": nb / n, "n_tokens": int(n)})
    finally:
        base_model.train(modes[0])
        tuned_model.train(modes[1])
    n_tokens = sum(r["n_tokens"] for r in per_prompt)

    def token_mean(key: str) -> float:  # over all answer tokens, not a mean of per-prompt means
        return sum(r[key] * r["n_tokens"] for r in per_prompt) / n_tokens

    return {
        "kl_base_to_tuned": token_mean("kl"),
        "tuned_perplexity": math.exp(token_mean("tuned_nll")),
        "base_perplexity": math.exp(token_mean("base_nll")),
        "n_tokens": n_tokens,
        "per_prompt": per_prompt,
    }


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
