"""Training checkpoints that resume exactly.

A checkpoint folder ``checkpoint-<step>`` holds the trainable weights (LoRA adapters or the whole
model) as safetensors, the optimizer and scheduler states and torch's generator states as tensors
(``optim_rng.pt``), Python's and NumPy's generator states as JSON (``rng.json``), and ``state.json``
(format, the run's key, step, data position, EMA balancer, counters). It is written under a temporary
name and renamed, so a crash while saving leaves the previous checkpoint as the latest.

A checkpoint is data, never code: ``optim_rng.pt`` is read with ``torch.load(weights_only=True)``,
which unpickles tensors, numbers, strings and containers only, so a tampered file cannot run
anything; one that holds anything else, or lacks a part, or was written for another run (its key
differs), is refused with ``CheckpointError`` naming the file.

Weights and optimizer state are full tensors keyed by parameter name, whatever the parallelism: a
run saved under FSDP resumes under DDP or on one process, and the other way round. Under FSDP the
gathering is collective, so every process calls ``save_checkpoint`` and only the main one writes.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raftune.distributed import (
    load_optimizer_state,
    load_trainable_state,
    optimizer_state,
    trainable_state,
)

PREFIX = "checkpoint-"
FORMAT = 2  # 2: RNG states as tensors and JSON, read with weights_only (1 pickled NumPy objects)


class CheckpointError(ValueError):
    """A checkpoint that is not what raftune wrote for this run."""


def rng_state() -> tuple[dict, dict]:
    """(torch's generator states as tensors, Python's and NumPy's as JSON-ready lists)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def replace_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder whole or not at all: ``write`` fills a hidden sibling, its files are synced to disk,
    and it replaces ``final``. A run killed while writing leaves the previous ``final`` (or none) and the
    hidden ``.<name>.tmp``, removed by the next write."""
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, state: dict, keep: int = 2,
                    write: bool = True) -> Path:
    """``write=False``: take part in the gathering (FSDP) without writing (every process but the main one)."""
    weights, optim = trainable_state(model), optimizer_state(model, optimizer)
    final = run / f"{PREFIX}{step}"
    if not write:
        return final

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "trainable.safetensors"))
        rng_tensors, rng_plain = rng_state()
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng_tensors}, tmp / "optim_rng.pt")
        (tmp / "rng.json").write_text(json.dumps(rng_plain))
        (tmp / "state.json").write_text(json.dumps({**state, "format": FORMAT, "step": step}, indent=2))

    replace_folder(final, write)
    for old in sorted(list_checkpoints(run))[:-keep]:
        shutil.rmtree(run / f"{PREFIX}{old}", ignore_errors=True)
    return final


def list_checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name[len(PREFIX):]) for p in run.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit())


def read_state(path: Path, key: str | None = None) -> dict:
    """``state.json`` of the checkpoint at ``path``, checked: raftune's format and, given ``key``, this run's key."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'state.json'}: not a readable raftune checkpoint state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'state.json'}: not a raftune checkpoint state (no step)")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format', 1)!r}, not {FORMAT}: written by another "
                              "raftune version; start a new run (another name or out_dir)")
    if key is not None and state.get("run_key") != key:
        raise CheckpointError(f"{path}: a checkpoint of another run (key {state.get('run_key')}, this run's {key}): "
                              "its settings, data or model differ; it is not resumed")
    return state


def load_checkpoint(path: Path, model, optimizer, scheduler, key: str | None = None) -> dict:
    """Restore everything saved by ``save_checkpoint``; returns its ``state.json``. Nothing in the folder
    is run: ``CheckpointError`` for a file that is not what raftune wrote, or a checkpoint of another run."""
    state = read_state(path, key)
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        blob = torch.load(path / "optim_rng.pt", weights_only=True, map_location="cpu")
        plain = json.loads((path / "rng.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        first = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: not a checkpoint raftune wrote, or damaged ({type(e).__name__}: {first}); "
                              "it is not loaded (nothing in it was run)") from None
    if not (isinstance(blob, dict) and {"optimizer", "scheduler", "rng"} <= blob.keys() and isinstance(plain, dict)
            and {"python", "numpy"} <= plain.keys()):
        raise CheckpointError(f"{path}: optim_rng.pt or rng.json lacks parts of a raftune checkpoint")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (first: {missing[0]}); "
                              "was it saved with other LoRA or model settings?")
    load_trainable_state(model, weights)
    load_optimizer_state(model, optimizer, blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    try:
        set_rng_state(blob["rng"], plain)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its random generator states are damaged ({e})") from None
    return state
