"""Training checkpoints that resume exactly.

A checkpoint folder ``checkpoint-<step>`` holds the trainable weights (LoRA adapters or the whole
model) as safetensors, the optimizer and scheduler states, every random generator's state, and
``state.json`` (step, data position, EMA balancer, counters). It is written under a temporary name
and renamed, so a crash while saving leaves the previous checkpoint as the latest.
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

PREFIX = "checkpoint-"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


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


def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, state: dict, keep: int = 2) -> Path:
    final = run / f"{PREFIX}{step}"
    tmp = run / f".{PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / "optim_rng.pt")
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
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (first: {missing[0]}); "
                           "was it saved with other LoRA or model settings?")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n].device, params[n].dtype))
    blob = torch.load(path / "optim_rng.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((path / "state.json").read_text())
