"""Training checkpoints that resume exactly.

A checkpoint folder ``checkpoint-<step>`` holds the trainable weights (LoRA adapters or the whole
model) as safetensors, the optimizer and scheduler states, every random generator's state, and
``state.json`` (step, data position, EMA balancer, counters). It is written under a temporary name
and renamed, so a crash while saving leaves the previous checkpoint as the latest.

Weights and optimizer state are full tensors keyed by parameter name, whatever the parallelism: a
run saved under FSDP resumes under DDP or on one process, and the other way round. Under FSDP the
gathering is collective, so every process calls ``save_checkpoint`` and only the main one writes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
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


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, state: dict, keep: int = 2,
                    write: bool = True) -> Path:
    """``write=False``: take part in the gathering (FSDP) without writing (every process but the main one)."""
    weights, optim = trainable_state(model), optimizer_state(model, optimizer)
    final = run / f"{PREFIX}{step}"
    if not write:
        return final
    tmp = run / f".{PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "optim_rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(list_checkpoints(run))[:-keep]:
        shutil.rmtree(run / f"{PREFIX}{old}", ignore_errors=True)
    return final


def list_checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name[len(PREFIX):]) for p in run.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit())


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything saved by ``save_checkpoint``; returns its ``state.json``."""
    weights = load_file(str(path / "trainable.safetensors"))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (first: {missing[0]}); "
                           "was it saved with other LoRA or model settings?")
    load_trainable_state(model, weights)
    blob = torch.load(path / "optim_rng.pt", weights_only=False)
    load_optimizer_state(model, optimizer, blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((path / "state.json").read_text())
