"""``raftune run``: refine, train each method on the result, evaluate them all, compare.

    raftune run --config configs/demo.yaml

The YAML has a ``refine`` section (RefineConfig fields), a ``train`` section (TrainConfig fields
shared by all methods), ``methods`` (default ``[raft]``) and an optional ``eval`` section
(EvalConfig fields but the model). Every method trains on the refine run's training split and
reports its held-out domain loss on the same ``heldout.jsonl``; ``sft`` trains on the original
answers, the others on the fused ones. With ``eval``, the base model and every trained one are
evaluated on the same suites (the domain suite on ``heldout.jsonl``), and ``raftune compare`` puts
them side by side. Refine, train and eval resume from their files, so running the same command
again after an interruption continues where it stopped.

A method entry is a method name, or a variant for ablations: a mapping with ``name``, ``method`` and
any TrainConfig fields for that run alone, e.g.
``{name: raft-chat, method: raft, teacher_context: chat}``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from raftune.compare import compare
from raftune.evaluate import EvalConfig, evaluate
from raftune.files import atomic_write_json
from raftune.refine import RefineConfig, refine
from raftune.train import METHODS, TrainConfig, train

log = logging.getLogger("raftune.pipeline")

ANSWER_FIELD = {"sft": "original_answer"}  # SFT learns the original answers; RAFT and the rest the fused ones


@dataclasses.dataclass(frozen=True)
class RunConfig:
    refine: RefineConfig
    train: dict  # TrainConfig fields shared by every method (data and method are filled in per method)
    methods: tuple = ("raft",)  # method names, or {name, method, **TrainConfig overrides} variants
    eval: dict | None = None  # EvalConfig fields shared by every evaluation (model and domain data are filled in)

    def __post_init__(self):
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown := set(self.train) - fields:
            raise ValueError(f"train: unknown setting(s) {sorted(unknown)}")
        labels = []
        for m in self.methods:
            if isinstance(m, str):
                m = {"name": m, "method": m}
            if not isinstance(m, dict) or not isinstance(m.get("name"), str) or "method" not in m:
                raise ValueError(f"methods: {m!r} is neither a method name nor a mapping with name and method")
            if m["method"] not in METHODS:
                raise ValueError(f"methods: unknown method {m['method']!r}; known: {sorted(METHODS)}")
            if unknown := set(m) - {"name"} - fields:
                raise ValueError(f"methods: {m['name']}: unknown setting(s) {sorted(unknown)}")
            labels.append(m["name"])
        if len(set(labels)) != len(labels) or "base" in labels:
            raise ValueError(f"methods: names must be unique and not 'base', got {labels}")
        if self.eval is not None:
            eval_fields = {f.name for f in dataclasses.fields(EvalConfig)} - {"model", "base_results", "name"}
            if unknown := set(self.eval) - eval_fields:
                raise ValueError(f"eval: unknown setting(s) {sorted(unknown)}")
        # every stage's values are checked now, not after refine has run for an hour
        placeholder = Path(self.refine.out_dir) / "refine-(to be made)"
        for label, tcfg in self.train_configs(placeholder):
            self.eval_config(placeholder, label, tcfg.model)

    def train_configs(self, refine_dir: Path) -> list[tuple[str, TrainConfig]]:
        """(label, TrainConfig) of every method, training on ``refine_dir``'s output."""
        out = []
        for entry in self.methods:
            variant = {"name": entry, "method": entry} if isinstance(entry, str) else dict(entry)
            label, method = variant.pop("name"), variant["method"]
            out.append((label, TrainConfig(**{"out_dir": str(refine_dir.parent), "model": self.refine.model, **self.train,
                                               "data": str(refine_dir / "fused.jsonl"),
                                               "answer_field": ANSWER_FIELD.get(method, "answer"),
                                               "reference_field": "answer",
                                               "eval_data": str(refine_dir / "heldout.jsonl"), **variant})))
        return out

    def eval_config(self, refine_dir: Path, label: str, model: str, base_results: str | None = None) -> EvalConfig | None:
        """The evaluation of ``model`` (labelled ``label``) on the suites of the eval section; None without one."""
        if self.eval is None:
            return None
        return EvalConfig(model=model, name=f"{refine_dir.name.removeprefix('refine-')}-{label}", base_results=base_results,
                          out_dir=str(refine_dir.parent), base_model=self.refine.model,
                          domain_data=str(refine_dir / "heldout.jsonl"), **self.eval)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if unknown := set(d) - {"refine", "train", "methods", "eval"}:
            raise ValueError(f"unknown section(s) {sorted(unknown)}; use refine, train, methods, eval")
        return cls(refine=RefineConfig(**(d.get("refine") or {})), train=dict(d.get("train") or {}),
                   methods=tuple(d.get("methods") or ("raft",)),
                   eval=dict(d["eval"] or {}) if "eval" in d else None)


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict:
    refine_dir = refine(cfg.refine, progress=progress)
    results = {"refine_dir": str(refine_dir), "methods": {}}
    for label, tcfg in cfg.train_configs(refine_dir):
        run = train(tcfg, progress=progress)
        evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_domain_loss" in r]
        results["methods"][label] = {"run_dir": str(run), "model": str(run / "model"),
                                      "base_domain_loss": evals[0]["eval_domain_loss"] if evals else None,
                                      "domain_loss": evals[-1]["eval_domain_loss"] if evals else None}
    if cfg.eval is not None:
        results["comparison"] = _evaluate_all(cfg, refine_dir, results, progress)
    atomic_write_json(refine_dir / "pipeline.json", results)
    return results


def _evaluate_all(cfg: RunConfig, refine_dir: Path, results: dict, progress: bool) -> dict:
    """The base model, then every trained one, on the same suites; then the side-by-side table."""
    tag = refine_dir.name.removeprefix("refine-")
    base_run = evaluate(cfg.eval_config(refine_dir, "base", cfg.refine.model), progress=progress)
    runs, labels = [base_run], ["base"]
    for method, r in results["methods"].items():
        run = evaluate(cfg.eval_config(refine_dir, method, r["model"], str(base_run / "results.json")), progress=progress)
        r["eval_dir"] = str(run)
        runs.append(run)
        labels.append(method)
    table = compare(runs, labels, refine_dir.parent / f"compare-{tag}")
    return {"dir": str(refine_dir.parent / f"compare-{tag}"), "markdown": table["markdown"], "plots": table["plots"]}
