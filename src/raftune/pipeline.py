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

Method entries, in the order they run:

- a method name (``raft``, ``sft``, ``onpolicy``, ``distill``, ``talr``, ``l2sp``, ``replay``), or
  ``sdft``: SFT on stage 1's SDFT rewrites (refine with ``mode: sdft``, run once for all entries);
- a variant for ablations: a mapping with ``name``, ``method`` and any TrainConfig fields for that
  run alone, e.g. ``{name: raft-fixed-0.1, method: raft, kl_lambda: 0.1}``; ``init_from: LABEL``
  starts it from an earlier entry's model, with the original model as ``teacher_model`` unless set
  (``{name: sft-then-distill, method: distill, init_from: sft}``: the two-phase on-policy recipe);
- a post-hoc transform of an earlier entry's model: ``{name: fapm, posthoc: fapm, from: sft, keep: 0.1}``
  or ``{name: wise-0.5, posthoc: wise, from: sft, alpha: 0.5}``.

Several entries of one method that differ only in a swept setting (``lr``, ``kl_lambda``,
``forgetting_budget``, ``l2sp_alpha``, ``replay_ratio``, ``talr_tau``; a post-hoc entry's ``alpha`` or
``keep``) are one trade-off curve: ``sft`` at three learning rates, ``wise(sft)`` at three alphas, ``sft
budget`` at three budgets (``RunConfig.curves``). ``curve: NAME`` in an entry puts it on a curve by hand.
pipeline.json records each entry's curve and swept setting, and the comparison draws every curve's
domain gain against its forgetting (``raftune.compare.tradeoff``). A post-hoc model's held-out domain
loss is measured here as training measures it, so WiSE-FT points have a gain too.

RAFT trains on the fused answers; every other method on the original answers (set ``answer_field:
answer`` for the "fused data + SFT" ablation).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from raftune.compare import SWEPT, compare, group_curves, training_outcome
from raftune.evaluate import EvalConfig, evaluate
from raftune.files import atomic_write_json
from raftune.refine import RefineConfig, refine
from raftune.settings import SettingsError, build
from raftune.train import METHODS, TrainConfig, train

log = logging.getLogger("raftune.pipeline")

FUSED_METHODS = {"raft"}  # train on the fused answers; every baseline on the original ones
POSTHOC = {"fapm": ("keep", 0.1), "wise": ("alpha", 0.5)}  # post-hoc transform -> its one setting and its default
ENTRY_KEYS = {"name", "init_from", "dataset", "curve"}  # keys of a train entry that are the pipeline's, not TrainConfig's


def posthoc_setting(entry: dict) -> tuple[str, float]:
    """(name, value) of a post-hoc entry's one setting, its default where the entry does not set it."""
    name, default = POSTHOC[entry["posthoc"]]
    return name, entry.get(name, default)


def normalize_entry(entry) -> dict:
    """A method entry as a mapping: ``name`` and either ``method`` (+ settings) or ``posthoc``."""
    if entry == "sdft":
        return {"name": "sdft", "method": "sft", "dataset": "sdft"}
    if isinstance(entry, str):
        return {"name": entry, "method": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not ("method" in entry or "posthoc" in entry):
        raise ValueError(f"methods: {entry!r} is neither a method name nor a mapping with name and method (or posthoc)")
    return dict(entry)


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
        labels, trained = [], set()
        for m in map(normalize_entry, self.methods):
            name = m["name"]
            if "curve" in m and not (isinstance(m["curve"], str) and m["curve"].strip()):
                raise ValueError(f"methods: {name}: curve must be a name (a non-empty string), got {m['curve']!r}")
            if "posthoc" in m:
                kind = m["posthoc"]
                if kind not in POSTHOC:
                    raise ValueError(f"methods: {name}: unknown post-hoc transform {kind!r}; known: {sorted(POSTHOC)}")
                setting, value = posthoc_setting(m)
                if unknown := set(m) - {"name", "posthoc", "from", "curve", setting}:
                    raise ValueError(f"methods: {name}: unknown setting(s) {sorted(unknown)}")
                if m.get("from") not in trained:
                    raise ValueError(f"methods: {name}: 'from' must name a trained entry listed before it, got {m.get('from')!r}")
                if not isinstance(value, (int, float)) or not (0 < value <= 1 if kind == "fapm" else 0 <= value <= 1):
                    raise ValueError(f"methods: {name}: {setting} must be a number in "
                                     f"{'(0, 1]' if kind == 'fapm' else '[0, 1]'}, got {value!r}")
            else:
                if m["method"] not in METHODS:
                    raise ValueError(f"methods: unknown method {m['method']!r}; known: {sorted(METHODS)} and sdft")
                if unknown := set(m) - ENTRY_KEYS - fields:
                    raise ValueError(f"methods: {name}: unknown setting(s) {sorted(unknown)}")
                if "init_from" in m and m["init_from"] not in trained:
                    raise ValueError(f"methods: {name}: init_from must name a trained entry listed before it, "
                                     f"got {m['init_from']!r}")
                if m.get("dataset", "fused") not in ("fused", "sdft"):
                    raise ValueError(f"methods: {name}: dataset must be fused or sdft, got {m['dataset']!r}")
                trained.add(name)
            labels.append(name)
        if len(set(labels)) != len(labels) or "base" in labels:
            raise ValueError(f"methods: names must be unique and not 'base', got {labels}")
        if self.eval is not None:
            eval_fields = {f.name for f in dataclasses.fields(EvalConfig)} - {"model", "base_results", "name"}
            if unknown := set(self.eval) - eval_fields:
                raise ValueError(f"eval: unknown setting(s) {sorted(unknown)}")
        # every stage's values are checked now, not after refine has run for an hour
        placeholder = Path(self.refine.out_dir) / "refine-(to be made)"
        models = {}
        for i, entry in enumerate(map(normalize_entry, self.methods)):
            if "posthoc" not in entry:
                tcfg = self.train_config(entry, placeholder, placeholder, models, index=i)
                models[entry["name"]] = str(placeholder / entry["name"])
                self.eval_config(placeholder, entry["name"], tcfg.model)

    @property
    def needs_sdft(self) -> bool:
        return any(normalize_entry(e).get("dataset") == "sdft" for e in self.methods)

    def train_config(self, entry: dict, refine_dir: Path, sdft_dir: Path | None, models: dict[str, str],
                     index: int | None = None) -> TrainConfig:
        """The TrainConfig of a train entry: on ``refine_dir``'s fused data (or ``sdft_dir``'s rewrites),
        from the original model or, with ``init_from``, from an earlier entry's model (``models``)."""
        variant = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
        data_dir = sdft_dir if entry.get("dataset") == "sdft" else refine_dir
        start = {}
        if "init_from" in entry:  # the original model stays the teacher
            start = {"model": models[entry["init_from"]], "teacher_model": self.refine.model}
        # a bad value is named where it came from: the method's own entry, or the train section
        where = {k: f"methods.{index}.{k}" if index is not None and k in variant else f"train.{k}" for k in
                 [f.name for f in dataclasses.fields(TrainConfig)] + list(variant) + list(self.train)}
        return build(TrainConfig, {"out_dir": str(refine_dir.parent), "model": self.refine.model, **self.train,
                              "data": str(data_dir / "fused.jsonl"),
                              # SDFT's rewrites, RAFT's fused answers, the original answers for the rest
                              "answer_field": "answer" if entry.get("dataset") == "sdft" or variant["method"] in FUSED_METHODS
                              else "original_answer",
                              "reference_field": "answer",
                              "eval_data": str(refine_dir / "heldout.jsonl"), **start, **variant}, keys_of=where)

    def curves(self) -> dict[str, dict]:
        """label -> ``{"curve": name, "setting": {swept setting: value}}`` for every entry. Train entries of
        one method, data and starting model whose own settings differ only in ``SWEPT`` are one curve (named
        by the method, with `` budget`` where a forgetting budget is set); post-hoc entries of one kind from
        one entry another (``wise(sft)``); ``curve`` in an entry names its curve by hand."""
        placeholder = Path(self.refine.out_dir) / "refine-(to be made)"
        members, models = {}, {}
        for entry in map(normalize_entry, self.methods):
            label = entry["name"]
            if "posthoc" in entry:
                setting, value = posthoc_setting(entry)
                members[label] = {"family": ["posthoc", entry["posthoc"], entry["from"]],
                                  "name": f"{entry['posthoc']}({entry['from']})", "settings": {setting: value}}
            else:
                tcfg = self.train_config(entry, placeholder, placeholder, models)
                models[label] = str(placeholder / label)
                settings = {k: getattr(tcfg, k) for k in SWEPT if hasattr(tcfg, k)}
                settings["lr"] = tcfg.learning_rate
                budgeted = settings.get("forgetting_budget") is not None
                own = {k: v for k, v in entry.items() if k not in {*SWEPT, "name", "curve"}}  # what the entry is
                members[label] = {"family": ["train", own, budgeted], "settings": settings,
                                  "name": ("sdft" if entry.get("dataset") == "sdft" else entry["method"]) + (" budget" if budgeted else "")}
            if "curve" in entry:
                members[label]["curve"] = entry["curve"]
        return group_curves(members)

    def eval_config(self, refine_dir: Path, label: str, model: str, base_results: str | None = None) -> EvalConfig | None:
        """The evaluation of ``model`` (labelled ``label``) on the suites of the eval section; None without one."""
        if self.eval is None:
            return None
        return build(EvalConfig, dict(model=model, name=f"{refine_dir.name.removeprefix('refine-')}-{label}",
                                      base_results=base_results, out_dir=str(refine_dir.parent), base_model=self.refine.model,
                                      domain_data=str(refine_dir / "heldout.jsonl"), **self.eval), prefix="eval.")

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if unknown := set(d) - {"refine", "train", "methods", "eval"}:
            raise ValueError(f"unknown section(s) {sorted(unknown)}; use refine, train, methods, eval")
        for section in ("refine", "train", "eval"):
            if d.get(section) is not None and not isinstance(d[section], dict):
                raise SettingsError([(section, f"expected a mapping of settings, got {type(d[section]).__name__} {d[section]!r}")])
        methods = d.get("methods") or ("raft",)
        if not isinstance(methods, (list, tuple)):
            raise SettingsError([("methods", f"expected a list of methods (e.g. [raft, sft]), got {type(methods).__name__} "
                                             f"{methods!r}")])
        return cls(refine=build(RefineConfig, dict(d.get("refine") or {}), prefix="refine."), train=dict(d.get("train") or {}),
                   methods=tuple(methods), eval=dict(d["eval"] or {}) if "eval" in d else None)


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict:
    refine_dir = refine(cfg.refine, progress=progress)
    sdft_dir = refine(dataclasses.replace(cfg.refine, mode="sdft"), progress=progress) if cfg.needs_sdft else None
    results = {"refine_dir": str(refine_dir), "sdft_dir": str(sdft_dir) if sdft_dir else None, "methods": {}}
    models: dict[str, str] = {}
    configs: dict[str, TrainConfig] = {}
    origin: dict[str, float | None] = {}  # the original model's held-out domain loss, as each entry's run measured it
    curves = cfg.curves()
    for entry in map(normalize_entry, cfg.methods):
        label = entry["name"]
        if "posthoc" in entry:
            r = results["methods"][label] = _posthoc(cfg, entry, refine_dir, models[entry["from"]])
            r["base_domain_loss"] = origin[entry["from"]]
            r["domain_loss"] = heldout_loss(r["model"], configs[entry["from"]])
            origin[label] = origin[entry["from"]]
        else:
            configs[label] = cfg.train_config(entry, refine_dir, sdft_dir, models)
            run = train(configs[label], progress=progress)
            # the held-out loss of the model saved: with a forgetting budget, maybe an earlier point's
            results["methods"][label] = {"run_dir": str(run), "model": str(run / "model"), **training_outcome(run)}
            # a run started from an earlier entry's model measured that model first, not the original one
            origin[label] = origin[entry["init_from"]] if "init_from" in entry else results["methods"][label]["base_domain_loss"]
        results["methods"][label].update(curves[label])
        models[label] = results["methods"][label]["model"]
    if cfg.eval is not None:
        points = {label: {**curves[label], "base_domain_loss": origin[label], "domain_loss": r["domain_loss"],
                          "budget_met": r.get("budget_met")} for label, r in results["methods"].items()}
        results["comparison"] = _evaluate_all(cfg, refine_dir, results, points, progress)
    atomic_write_json(refine_dir / "pipeline.json", results)
    return results


def _posthoc(cfg: RunConfig, entry: dict, refine_dir: Path, tuned: str) -> dict:
    """FAPM or WiSE-FT of an earlier entry's model, into its own folder beside the runs (made once: a rerun
    with the same setting and models finds it done; another setting or a retrained model makes it again)."""
    from raftune import posthoc

    kind = entry["posthoc"]
    setting, value = posthoc_setting(entry)
    out = refine_dir.parent / f"{kind}-{refine_dir.name.removeprefix('refine-')}-{entry['name']}"
    model = out if kind == "fapm" else out / f"wise-{value:g}"  # wise writes one folder per alpha
    if kind == "fapm":
        posthoc.fapm(cfg.refine.model, tuned, str(out), keep=value)
    else:
        posthoc.wise(cfg.refine.model, tuned, str(out), alphas=[value])
    return {"run_dir": str(model), "model": str(model), "posthoc": kind, "from": entry["from"], setting: value,
            "base_domain_loss": None, "domain_loss": None}


def heldout_loss(model: str, tcfg: TrainConfig) -> float | None:
    """The held-out domain loss of ``model`` measured as the training run of ``tcfg`` measures its own: the
    same held-out examples (data, limit, length guard), batch size, device and precision. For a model no
    training run measured (a post-hoc transform's); None without held-out data."""
    import torch

    from raftune.data import load_qa
    from raftune.models import load_model_and_tokenizer, pick_device
    from raftune.sequences import end_of_turn_id
    from raftune.train import TokenLosses, _fitting, domain_loss

    if not tcfg.eval_data:
        return None
    device = pick_device(tcfg.device)
    lm, tok = load_model_and_tokenizer(model, device=str(device), dtype=tcfg.dtype or "fp32")
    # train's own length guard, so the examples are those its runs measured (not a second copy of the rule)
    examples, _ = _fitting(load_qa(tcfg.eval_data, limit=tcfg.eval_limit)[0], tok, tcfg, tcfg.resolve(tok), lm)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.bf16(device.type)):  # training's held-out loss runs under it too
        return domain_loss(TokenLosses(lm), tok, examples, tcfg.batch_size, tcfg.max_len,
                           end_of_turn_id(tok, lm.generation_config), tcfg.loss_chunk)


def _evaluate_all(cfg: RunConfig, refine_dir: Path, results: dict, points: dict, progress: bool) -> dict:
    """The base model, then every trained one, on the same suites; then the side-by-side table, with each
    entry's trade-off point (``points``: its curve, swept setting and held-out domain losses)."""
    tag = refine_dir.name.removeprefix("refine-")
    base_run = evaluate(cfg.eval_config(refine_dir, "base", cfg.refine.model), progress=progress)
    runs, labels = [base_run], ["base"]
    for method, r in results["methods"].items():
        run = evaluate(cfg.eval_config(refine_dir, method, r["model"], str(base_run / "results.json")), progress=progress)
        r["eval_dir"] = str(run)
        runs.append(run)
        labels.append(method)
    table = compare(runs, labels, refine_dir.parent / f"compare-{tag}", points=points)
    return {"dir": str(refine_dir.parent / f"compare-{tag}"), "markdown": table["markdown"], "plots": table["plots"]}
