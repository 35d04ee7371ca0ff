"""``raftune run``: refine, then train each method on the result, from one config file.

    raftune run --config configs/demo.yaml

The YAML has a ``refine`` section (RefineConfig fields), a ``train`` section (TrainConfig fields
shared by all methods) and ``methods`` (default ``[raft]``). Every method trains on the refine run's
training split and reports its held-out domain loss on the same ``heldout.jsonl``; ``sft`` trains on
the original answers, the others on the fused ones. Each stage resumes from its files, so running
the same command again after an interruption continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import logging

from raftune.files import atomic_write_json
from raftune.refine import RefineConfig, refine
from raftune.train import METHODS, TrainConfig, train

log = logging.getLogger("raftune.pipeline")

ANSWER_FIELD = {"sft": "original_answer"}  # SFT learns the original answers; RAFT and the rest the fused ones


@dataclasses.dataclass(frozen=True)
class RunConfig:
    refine: RefineConfig
    train: dict  # TrainConfig fields shared by every method (data and method are filled in per method)
    methods: tuple[str, ...] = ("raft",)

    def __post_init__(self):
        if unknown := [m for m in self.methods if m not in METHODS]:
            raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown := set(self.train) - fields:
            raise ValueError(f"train: unknown setting(s) {sorted(unknown)}")

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if unknown := set(d) - {"refine", "train", "methods"}:
            raise ValueError(f"unknown section(s) {sorted(unknown)}; use refine, train, methods")
        return cls(refine=RefineConfig(**(d.get("refine") or {})), train=dict(d.get("train") or {}),
                   methods=tuple(d.get("methods") or ("raft",)))


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict:
    refine_dir = refine(cfg.refine, progress=progress)
    results = {"refine_dir": str(refine_dir), "methods": {}}
    for method in cfg.methods:
        tcfg = TrainConfig(**{"out_dir": str(refine_dir.parent), "model": cfg.refine.model, **cfg.train,
                              "data": str(refine_dir / "fused.jsonl"), "method": method,
                              "answer_field": ANSWER_FIELD.get(method, "answer"),
                              "reference_field": "answer",
                              "eval_data": str(refine_dir / "heldout.jsonl")})
        run = train(tcfg, progress=progress)
        evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_domain_loss" in r]
        results["methods"][method] = {"run_dir": str(run), "model": str(run / "model"),
                                      "base_domain_loss": evals[0]["eval_domain_loss"] if evals else None,
                                      "domain_loss": evals[-1]["eval_domain_loss"] if evals else None}
    atomic_write_json(refine_dir / "pipeline.json", results)
    return results
