"""``raftune compare``: evaluation runs side by side, shaped like the paper's Table 1 and Table 4.

    raftune compare runs/eval-base runs/eval-sft runs/eval-raft --out runs/compare

Each argument is an eval run folder (or its results.json). Every input is checked before anything is
built or written (``load_result``): a file that is not an eval run's results.json, or holds a value
of the wrong type or one no evaluation can produce (a rate outside [0, 1], a score outside 1-10, a
negative or fractional count, NaN), stops the comparison with a ``CompareError`` naming the file and
the key. An evaluation that had not finished (``"complete": false``) is tabled with a warning, its
label marked ``(incomplete)`` and a footnote naming its missing suites.

A delta or a retention is a number only between runs whose suite scored the same samples the same
way (``comparability``): the same data (the content hash raftune eval records under ``inputs.data``),
the same counts of samples scored and the same way of scoring (MMLU form, shots and subjects; the
general suite's mode and aggregate). Otherwise it is ``n/c``, with a warning and a footnote; where a
results.json holds no data hash (an older raftune eval), the output says the data was not checked.

Rows are the runs (labelled by ``--label`` or the folder name); columns are D-Acc and each general
metric, with the change vs the run labelled ``sft`` when there is one (Table 1), and the retention of
every general metric vs the run labelled ``base`` (Table 4). Written as Markdown and JSON, with
plots: retention bars, the trade-off scatter (D-Acc vs mean general retention), and the training
curves (CE, KL, lambda) of the runs whose model came from ``raftune train``.

The trade-off (``tradeoff``): every run's domain gain (the base model's held-out domain loss minus the
run's) against its forgetting (drift KL; 1 - IFEval strict retention), one curve per method: the runs
that differ only in a swept setting (learning rate, lambda, forgetting budget, WiSE-FT alpha, ...), the
Pareto front marked and the base at the origin, as a table section and ``tradeoff_curves.png``.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from raftune import outputs
from raftune.files import atomic_write_text, read_jsonl_log, stable_hash

log = logging.getLogger("raftune.compare")

# (column, path into results.json, higher is better)
DOMAIN = ("D-Acc", ("domain", "d_acc"), True)
GENERAL = [
    ("IFEval strict", ("ifeval", "prompt_strict"), True),
    ("IFEval loose", ("ifeval", "prompt_loose"), True),
    ("MMLU", ("mmlu", "accuracy"), True),
    ("General", ("general", "mean_score"), True),
    ("General win rate", ("general", "win_rate"), True),  # pairwise vs the base model
]
OTHER = [
    ("ROUGE-L", ("domain", "rouge_l"), True),
    ("cosine", ("domain", "cosine"), True),
    ("drift KL", ("drift", "kl_base_to_tuned"), False),
    ("weight dist.", ("weights", "mean"), False),
]


def lm_eval_columns(runs: dict[str, dict]) -> list:
    """One general column per higher-is-better lm-eval metric any run reports (its suite's flat ``metrics``,
    ``task/metric,filter``): tabled, compared with SFT and retained vs base like the fixed ones."""
    keys = dict.fromkeys(k for r in runs.values() for k in ((_suites(r).get("lm-eval") or {}).get("metrics") or {}))
    return [(f"lm-eval {k}", ("lm-eval", "metrics", k), True) for k in keys]


def _column_suite(column: str) -> str:
    return COLUMN_SUITE.get(column) or "lm-eval"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _suites(results: dict) -> dict:
    return results.get("suites", results)  # an eval run's results.json keeps its suites under "suites"


def _get(results: dict, path: tuple[str, ...]):
    node = _suites(results)
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if _finite(node) else None  # NaN is no value: it would be no JSON either


# --- reading and checking the inputs -------------------------------------------------------------------------

# keys every results.json of ``raftune eval`` has held ("complete" and "settings" came later: optional here)
REQUIRED_KEYS = ("suites", "config")


# what an evaluation can produce: suite -> metric -> (low, high, what it is); None is always allowed (nothing scored)
_RATE = (0, 1, "a rate")
RANGES = {
    "domain": {"d_acc": _RATE, "rouge_l": _RATE, "cosine": (-1, 1, "a cosine")},
    "ifeval": dict.fromkeys(("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"), _RATE),
    "mmlu": {"accuracy": _RATE},
    "general": {"mean_score": (1, 10, "a score"), "win_rate": _RATE},  # the judges score 1-10
    "drift": {"kl_base_to_tuned": (0, math.inf, "a divergence"), "tuned_perplexity": (1, math.inf, "a perplexity"),
              "base_perplexity": (1, math.inf, "a perplexity")},
    "weights": {"mean": (0, math.inf, "a distance")},
}
COUNTS = {  # summary keys that count something: integers >= 0
    "domain": ("n", "n_judged", "n_unjudged", "unreadable_verdicts"),
    "ifeval": ("n_prompts",),
    "mmlu": ("n", "shots"),
    "general": ("n", "n_scored", "n_unscored", "n_judged", "n_unjudged", "wins", "ties", "losses", "identical"),
    "drift": ("n_tokens",),
    "weights": ("n_tensors",),
}
_SLACK = 1e-5  # fp32 rounding: the cosine of two equal embeddings can be 1.0000001, still a cosine


class CompareError(ValueError):
    """An input ``compare`` cannot table; the message starts with the file (and the key, where one is wrong)."""


def _got(value) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _results_path(arg: str | Path) -> Path:
    path = Path(arg)
    if path.is_dir():
        if not (path / "results.json").is_file():
            raise CompareError(f"{path}: no results.json in this folder (is it an eval run folder?)")
        return path / "results.json"
    if not path.exists():
        raise CompareError(f"{path}: not found (expected an eval run folder or its results.json)")
    return path


def _read_json(path: Path):
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CompareError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CompareError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); is it a results.json?") from None
    if not text.strip():
        raise CompareError(f"{path}: empty file, not an eval results.json")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise CompareError(f"{path}: JSON nested too deeply to be an eval results.json") from None


def _check_result(path: Path, results) -> None:
    """The shape of an eval results.json, down to the values the table reads (other keys are not looked at)."""
    def fail(where: str, expected: str, value):
        raise CompareError(f"{path}: {where}: expected {expected}, got {_got(value)}")

    if not isinstance(results, dict):
        raise CompareError(f"{path}: expected a JSON object (an eval results.json), got {_got(results)}")
    if missing := [k for k in REQUIRED_KEYS if k not in results]:
        raise CompareError(f"{path}: not a raftune evaluation result: no {' or '.join(map(repr, missing))} key "
                           f"(an eval run's results.json has {', '.join(map(repr, REQUIRED_KEYS))})")
    suites, config = results["suites"], results["config"]
    for key, value in (("suites", suites), ("config", config)):
        if not isinstance(value, dict):
            fail(key, "an object", value)
    if "complete" in results and not isinstance(results["complete"], bool):
        fail("complete", "true or false", results["complete"])
    tabled = dict.fromkeys([*(path[0] for _, path, _ in [DOMAIN, *GENERAL, *OTHER]), "lm-eval"])
    if not tabled.keys() & suites.keys():
        raise CompareError(f"{path}: suites: none of the suites compare tables ({', '.join(tabled)}); "
                           f"found: {', '.join(suites) or 'none'}")
    def check_metrics(where: str, summary: dict, ranges: dict, counts) -> None:
        for metric, (low, high, what) in ranges.items():
            value = summary.get(metric)
            if value is None:
                continue
            if not _is_number(value):
                fail(f"{where}.{metric}", "a number", value)
            if not (math.isfinite(value) and low - _SLACK <= value <= high + _SLACK):
                fail(f"{where}.{metric}", f"{what} >= {low}" if high == math.inf else f"{what} in [{low}, {high}]", value)
        for key in counts:
            value = summary.get(key)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                fail(f"{where}.{key}", "a count (an integer >= 0)", value)

    for suite in [s for s in RANGES if s in suites]:
        if not isinstance(suites[suite], dict):
            fail(f"suites.{suite}", "an object", suites[suite])
        check_metrics(f"suites.{suite}", suites[suite], RANGES[suite], COUNTS[suite])
    lm_metrics = suites.get("lm-eval", {}).get("metrics") if isinstance(suites.get("lm-eval"), dict) else None
    if lm_metrics is not None:  # lm-eval's own metrics have no range raftune knows: finite numbers
        if not isinstance(lm_metrics, dict):
            fail("suites.lm-eval.metrics", "an object", lm_metrics)
        for key, value in lm_metrics.items():
            if value is not None and not _finite(value):
                fail(f"suites.lm-eval.metrics.{key}", "a finite number", value)
    per_subject = suites.get("mmlu", {}).get("per_subject")  # its counts are read for comparability
    if per_subject is not None:
        if not isinstance(per_subject, dict):
            fail("suites.mmlu.per_subject", "an object", per_subject)
        for subject, summary in per_subject.items():
            if not isinstance(summary, dict):
                fail(f"suites.mmlu.per_subject.{subject}", "an object", summary)
            check_metrics(f"suites.mmlu.per_subject.{subject}", summary, RANGES["mmlu"], ("n",))
    inputs = results.get("inputs", {})  # the content hashes of what the evaluation read, for comparability
    if not isinstance(inputs, dict):
        fail("inputs", "an object", inputs)
    data = inputs.get("data", {})
    if not isinstance(data, dict):
        fail("inputs.data", "an object", data)
    for key, value in data.items():
        if value is not None and not isinstance(value, str):
            fail(f"inputs.data.{key}", "a content hash (a string)", value)
    planned = config.get("suites")  # read for the missing suites of an incomplete evaluation
    if planned is not None and not (isinstance(planned, list) and all(isinstance(s, str) for s in planned)):
        fail("config.suites", "a list of suite names", planned)
    if config.get("model") is not None and not isinstance(config["model"], str):  # read for training curves
        fail("config.model", "a string", config["model"])


def _missing_suites(results: dict) -> list[str]:
    """The suites an evaluation was configured for that its results.json does not hold yet."""
    return [s for s in (results.get("config") or {}).get("suites") or [] if s not in results.get("suites", {})]


def load_result(arg: str | Path) -> dict:
    """An eval run's results.json (``arg``: the run folder or the file), checked; raises ``CompareError``
    naming the file. Warns when the evaluation had not finished."""
    path = _results_path(arg)
    results = _read_json(path)
    _check_result(path, results)
    if results.get("complete") is False:
        missing = _missing_suites(results)
        what = f"missing suite(s) {', '.join(missing)}" if missing else "every suite present but not marked complete"
        log.warning("%s: incomplete evaluation (\"complete\": false), %s; tabled and marked (incomplete)", path, what)
    return results


# --- comparability: the same samples, scored the same way ----------------------------------------------------

# suite -> (its data source: a key of results.json's "inputs.data", where raftune eval records the content hash of
# what it read; the summary keys that say how many samples were scored and how). A limit takes the first rows of
# its data, so the same data and the same counts are the same samples.
SUITE_DATA = {
    "domain": ("domain_data", ("n", "n_judged")),
    "ifeval": ("ifeval_data", ("n_prompts",)),
    "mmlu": ("mmlu_folder", ("n", "form", "shots")),
    "general": ("general_data", ("mode", "aggregate", "n", "n_scored", "n_judged")),
    "drift": ("general_data", ("n_tokens",)),
    "lm-eval": ("lm_eval", ("n_samples", "num_fewshot", "limit", "chat")),  # lm_eval: the tasks' files and lm-eval's version
}
RETAINED_SUITES = (*dict.fromkeys(path[0] for _, path, _ in GENERAL), "lm-eval")  # what retention vs base is computed on
COLUMN_SUITE = {name: path[0] for name, path, _ in [DOMAIN, *GENERAL, *OTHER]}


def _data_hash(results: dict, key: str) -> str | None:
    data = (results.get("inputs") or {}).get("data") or {}
    return data.get(key) if isinstance(data, dict) else None


def _short(fingerprint: str) -> str:
    kind, _, digest = fingerprint.rpartition(":")
    return f"{kind}:{digest[:12]}" if kind else digest[:12]


def _subject_counts(summary: dict) -> dict | None:
    per_subject = summary.get("per_subject")
    return {s: v.get("n") for s, v in per_subject.items()} if isinstance(per_subject, dict) else None


def suite_comparability(run: dict, ref: dict, suite: str, ref_label: str) -> dict:
    """``{"comparable": True | False | None, "why": [reasons]}``: whether ``suite`` of ``run`` scored the same
    samples the same way as that of ``ref`` (labelled ``ref_label``). False where the data's content hash,
    a count of samples scored or the way of scoring differs; None where nothing differs as far as can be
    told but a results.json holds no content hash of the data."""
    data_key, keys = SUITE_DATA[suite]
    mine, theirs = _suites(run)[suite], _suites(ref)[suite]
    why = [f"{k} {_got(mine[k])} vs {_got(theirs[k])}" for k in keys if k in mine and k in theirs and mine[k] != theirs[k]]
    a, b = _subject_counts(mine), _subject_counts(theirs)
    if a is not None and b is not None and a != b:
        if a.keys() != b.keys():
            why.append(f"subjects differ (only here: {', '.join(sorted(a.keys() - b.keys())) or 'none'}; "
                       f"only in {ref_label}: {', '.join(sorted(b.keys() - a.keys())) or 'none'})")
        else:
            why.append("samples per subject differ (" + ", ".join(f"{s} {a[s]} vs {b[s]}" for s in a if a[s] != b[s]) + ")")
    mine_hash, their_hash = _data_hash(run, data_key), _data_hash(ref, data_key)
    if mine_hash and their_hash and mine_hash != their_hash:
        why.insert(0, f"{data_key} differs (content {_short(mine_hash)} vs {_short(their_hash)})")
    if why:
        return {"comparable": False, "why": why}
    if not (mine_hash and their_hash):
        return {"comparable": None, "why": [f"no content hash of {data_key} in a results.json (an older raftune eval)"]}
    return {"comparable": True, "why": []}


def comparability(runs: dict[str, dict]) -> dict:
    """``{"sft": {label: {suite: verdict}}, "base": {...}}``: every run's suites against those of the run
    its deltas (``sft``) and its retention (``base``) are computed against; verdicts of ``suite_comparability``."""
    out = {}
    for ref, suites in (("sft", tuple(SUITE_DATA)), ("base", RETAINED_SUITES)):
        if ref not in runs:
            continue
        theirs = _suites(runs[ref])
        out[ref] = {label: {s: suite_comparability(r, runs[ref], s, ref) for s in suites
                            if isinstance(_suites(r).get(s), dict) and isinstance(theirs.get(s), dict)}
                    for label, r in runs.items() if label != ref}
    return out


def _comparable(table: dict, ref: str, label: str, column: str) -> bool:
    """False only where the column's suite is known to differ between ``label`` and ``ref``."""
    verdict = table.get("comparability", {}).get(ref, {}).get(label, {}).get(_column_suite(column))
    return verdict is None or verdict["comparable"] is not False


def _ratio(value, base):
    if value is None or not base:
        return None
    ratio = value / base
    return ratio if math.isfinite(ratio) else None  # a tiny base overflows: no ratio rather than Infinity


def build_table(runs: dict[str, dict]) -> dict:
    """{"columns": [...], "rows": {label: {column: value}}, "retention": {label: {column: ratio}},
    "incomplete": {label: [missing suites]} (the runs whose results.json says ``"complete": false``),
    "comparability": see ``comparability``}. A retention whose suite is not comparable with the base's is None."""
    general = [*GENERAL, *lm_eval_columns(runs)]
    columns = [c for c in [DOMAIN, *general, *OTHER] if any(_get(r, c[1]) is not None for r in runs.values())]
    rows = {label: {name: _get(r, path) for name, path, _ in columns} for label, r in runs.items()}
    table = {"columns": [c[0] for c in columns], "general_columns": [c[0] for c in general], "rows": rows,
             "comparability": comparability(runs)}
    base = rows.get("base")
    retention = {}
    if base:
        for label, row in rows.items():
            retention[label] = {name: (_ratio(row[name], base[name]) if _comparable(table, "base", label, name) else None)
                                for name in table["general_columns"] if name in row}
    table["retention"] = retention
    table["incomplete"] = {label: _missing_suites(r) for label, r in runs.items() if r.get("complete") is False}
    return table


def _not_comparable_notes(table: dict, ref: str, suites) -> str:
    """The footnotes of one table: each pair of runs and suite that is not comparable, and those unchecked."""
    out = ""
    for label, verdicts in table.get("comparability", {}).get(ref, {}).items():
        for suite, v in verdicts.items():
            if suite in suites and v["comparable"] is False:
                out += (f"\nn/c: `{label}` vs `{ref}`, suite {suite}: {'; '.join(v['why'])}; not comparable, so no "
                        f"{'change' if ref == 'sft' else 'retention'} is given.\n")
        unchecked = [s for s, v in verdicts.items() if s in suites and v["comparable"] is None]
        if unchecked:
            out += (f"\nnot checked: `{label}` vs `{ref}`, suite(s) {', '.join(unchecked)}: a results.json holds no "
                    "content hash of the data (written by an older raftune eval); the same data is assumed.\n")
    return out


def _warn_comparability(table: dict) -> None:
    unchecked = []
    for ref, by_label in table["comparability"].items():
        what = "deltas" if ref == "sft" else "retention"
        for label, verdicts in by_label.items():
            for suite, v in verdicts.items():
                if v["comparable"] is False:
                    log.warning("%s vs %s: suite %s not comparable (%s); no %s reported for it", label, ref, suite,
                                "; ".join(v["why"]), what)
            if suites := [s for s, v in verdicts.items() if v["comparable"] is None]:
                unchecked.append(f"{label} vs {ref} ({', '.join(suites)})")
    if unchecked:  # one line: every pair of runs from an older eval lacks the hashes alike
        log.warning("could not check the data of %s: a results.json holds no content hash of its data (an older "
                    "raftune eval); tabled on trust", ", ".join(unchecked))


def _shown(label: str, table: dict) -> str:
    """A run's label as printed and plotted: marked where its evaluation had not finished."""
    return f"{label} (incomplete)" if label in table.get("incomplete", {}) else label


def _fmt(v, pct: bool) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.4g}"


def _general_names(table: dict) -> list[str]:
    return table.get("general_columns") or [c for c, _, _ in GENERAL]


def to_markdown(table: dict) -> str:
    cols = table["columns"]
    pct = {c: c in ("D-Acc", "IFEval strict", "IFEval loose", "MMLU", "General win rate") for c in cols}
    ref = table["rows"].get("sft")
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, row in table["rows"].items():
        cells = []
        for c in cols:
            cell = _fmt(row[c], pct[c])
            if ref and label != "sft" and row[c] is not None and ref[c] is not None and not _comparable(table, "sft", label, c):
                cell += " (n/c vs SFT)"
            elif ref and label != "sft" and row[c] is not None and ref[c] is not None:
                delta = (row[c] - ref[c]) * (100 if pct[c] else 1)
                cell += f" ({delta:+.1f} vs SFT)" if pct[c] else f" ({delta:+.3g} vs SFT)"
            cells.append(cell)
        lines.append(f"| {_shown(label, table)} | " + " | ".join(cells) + " |")
    out = "## Results (Table 1 shape)\n\nPercentages for accuracies; change vs the run labelled `sft` in brackets.\n\n"
    out += "\n".join(lines) + "\n"
    out += _not_comparable_notes(table, "sft", {_column_suite(c) for c in cols})
    for label, missing in table.get("incomplete", {}).items():
        out += (f"\n(incomplete) `{label}`: its evaluation had not finished (`\"complete\": false`); "
                + (f"missing suite(s): {', '.join(missing)}. " if missing else "")
                + "Not a final result: rerun its `raftune eval` to finish it.\n")
    gcols = [c for c in _general_names(table) if any(r.get(c) is not None for r in table["retention"].values())]
    if gcols:  # retention exists only for general metrics
        out += "\n## Retention vs base (Table 4 shape)\n\n| method | " + " | ".join(gcols) + " |\n"
        out += "|---" * (len(gcols) + 1) + "|\n"
        for label, r in table["retention"].items():
            cells = ["n/c" if not _comparable(table, "base", label, c) else "-" if r.get(c) is None else f"{100 * r[c]:.1f}%"
                     for c in gcols]
            out += f"| {_shown(label, table)} | " + " | ".join(cells) + " |\n"
        out += _not_comparable_notes(table, "base", {_column_suite(c) for c in gcols})
    return out


def plot_comparison(table: dict, out_dir: Path, runs_by_label: dict[str, dict] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ret = table["retention"]
    labels = dict.fromkeys([*table["rows"], *(runs_by_label or {})])
    color = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per run in every plot
    gcols = [c for c in _general_names(table) if any(r.get(c) is not None for r in ret.values())]
    if gcols:  # retention bars and the trade-off need general metrics
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(gcols) * max(1, len(ret)) / 2, 3.6))
        width = 0.8 / max(1, len(ret))
        for i, (label, r) in enumerate(ret.items()):
            ax.bar([j + i * width for j in range(len(gcols))], [100 * (r.get(c) or 0) for c in gcols], width,
                   label=_shown(label, table), color=color[label])
        ax.axhline(100, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks([j + width * (len(ret) - 1) / 2 for j in range(len(gcols))], gcols)
        ax.set_ylabel("retention vs base (%)")
        ax.legend()
        written.append(_save(fig, out_dir / "retention.png"))
        pts = [(label, table["rows"][label].get("D-Acc"), [v for v in r.values() if v is not None])
               for label, r in ret.items()]
        pts = [(label, d, sum(v) / len(v)) for label, d, v in pts if d is not None and v]
        if pts:
            fig, ax = plt.subplots(figsize=(4.8, 3.8))
            for label, d, g in pts:
                ax.scatter(100 * d, 100 * g, color=color[label])
                ax.annotate(_shown(label, table), (100 * d, 100 * g), textcoords="offset points", xytext=(4, 4))
            ax.set_xlabel("D-Acc (%)")
            ax.set_ylabel("mean general retention (%)")
            ax.set_title("Domain gain vs general ability")
            written.append(_save(fig, out_dir / "tradeoff.png"))
    curves = {label: _training_metrics(r) for label, r in runs_by_label.items()} if runs_by_label else {}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        keys = [k for k in ("ce", "kl", "lambda") if any(k in row for rows in curves.values() for row in rows)]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for label, rows in curves.items():
                pts = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=_shown(label, table), color=color[label])
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.legend()
        written.append(_save(fig, out_dir / "training_curves.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _training_metrics(results: dict) -> list[dict]:
    """The per-step training metrics of the model an eval run evaluated, when it came from `raftune train`
    (a model folder beside its metrics.jsonl). A training log that cannot be read costs its curves, not the table."""
    if (model := _model_folder(results)) is None:  # a hub id, "default", a server
        return []
    path = model.parent / "metrics.jsonl"
    try:
        rows = read_jsonl_log(path, repair=False)  # a line cut off by a crash is skipped
    except (OSError, ValueError) as e:
        log.warning("%s: no training curves (%s)", path, e)
        return []
    return [row for row in rows if isinstance(row, dict) and "lr" in row and _is_number(row.get("step"))]


# --- the trade-off: domain gain against forgetting, one curve per method -------------------------------------

# the forgetting axes, each 0 for the base model: drift KL as the drift suite reports it, and 1 - IFEval retention
FORGETTING = ("drift KL", "IFEval strict forgetting")
# the settings a sweep varies: the runs of one curve differ in these and nothing else
SWEPT = ("lr", "kl_lambda", "forgetting_budget", "l2sp_alpha", "replay_ratio", "talr_tau", "alpha", "keep")
# what a swept setting left unset (null) means, as the table prints it
UNSET = {"kl_lambda": "EMA", "forgetting_budget": "off", "talr_tau": "median", "l2sp_alpha": "method's"}
# the settings of a train run's config.json that say what was trained (read where no curve was given)
METHOD_KEYS = ("method", "model", "teacher_model", "data", "answer_field", "teacher_context", "top_k", "kl_direction",
               "lora", "replay_data", "epochs", "max_steps", "batch_size")
_BASE_LOSS_RTOL = 1e-3  # held-out losses of the base model further apart than this were measured on other data


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The labels of ``points`` (label -> (forgetting, domain gain)) that no other point dominates, in input
    order. Less forgetting and more gain are better; a point dominates another that it matches or beats on
    both and beats on one, so two equal points are both on the front."""
    return [a for a, (x, y) in points.items()
            if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for b, (x2, y2) in points.items() if b != a)]


def group_curves(members: dict[str, dict]) -> dict[str, dict]:
    """label -> ``{"curve": name, "setting": {swept setting: value}}``. ``members``: label -> ``{"family":
    what the run is but for its swept settings (any JSON value), "name": the curve's name, "settings": {swept
    setting: value}}``, or ``{"curve": name}`` (explicit, optionally with "settings"). Runs of one family are one
    curve, and ``setting`` holds the swept settings whose values differ along it (empty for a single run); a
    curve of one run is named by the run's label, and a name two curves would share gets its first run's label."""
    families: dict[str, list[str]] = {}
    for label, m in members.items():
        key = json.dumps(["curve", m["curve"]] if "curve" in m else ["family", m["family"]], sort_keys=True, default=str)
        families.setdefault(key, []).append(label)
    out, names = {}, {}
    for key, labels in families.items():
        first = members[labels[0]]
        name = first.get("curve") or (first["name"] if len(labels) > 1 else labels[0])
        if name in names.values():
            name = f"{name} ({labels[0]})"
        names[key] = name
        settings = [members[label].get("settings") or {} for label in labels]
        varied = [k for k in SWEPT if len({json.dumps(s.get(k)) for s in settings}) > 1]
        for label, s in zip(labels, settings):
            out[label] = {"curve": name, "setting": {k: s.get(k) for k in varied}}
    return out


def format_setting(setting: dict) -> str:
    """``{"lr": 1e-05, "kl_lambda": None}`` as ``lr 1e-05, kl_lambda EMA``; ``-`` for none."""
    parts = [f"{k} {UNSET.get(k, 'default') if v is None else format(v, 'g') if _is_number(v) else v}"
             for k, v in setting.items()]
    return ", ".join(parts) or "-"


def _json_file(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _model_folder(results: dict) -> Path | None:
    model = (results.get("config") or {}).get("model")
    return Path(model) if isinstance(model, str) and model and Path(model).is_dir() else None


def training_outcome(run: str | Path) -> dict:
    """``{"base_domain_loss", "domain_loss", "budget_met"}`` of a training run folder: the held-out domain
    loss of the model it started from (the first ``eval_domain_loss`` of metrics.jsonl) and of the model
    it saved in ``model/``: the last one, or, where a forgetting budget chose an earlier point, that
    point's (config.json's ``budget``); ``budget_met`` from there too (None without a budget)."""
    run = Path(run)
    losses = [row["eval_domain_loss"] for row in _eval_rows(run / "metrics.jsonl")]
    budget = (_json_file(run / "config.json") or {}).get("budget")
    budget = budget if isinstance(budget, dict) else {}
    saved = budget.get("eval_domain_loss") if budget.get("met") and _finite(budget.get("eval_domain_loss")) else None
    return {"base_domain_loss": losses[0] if len(losses) >= 2 else None,
            "domain_loss": saved if saved is not None else losses[-1] if len(losses) >= 2 else None,
            "budget_met": budget["met"] if isinstance(budget.get("met"), bool) else None}


def _eval_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        rows = read_jsonl_log(path, repair=False)
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and _finite(r.get("eval_domain_loss")) and _is_number(r.get("step"))]


def infer_points(runs: dict[str, dict]) -> dict[str, dict]:
    """Trade-off points read from the files beside each evaluated model (for ``raftune compare`` on its own;
    ``raftune run`` knows its entries and passes them): a model a training run saved is one run of the curve
    of its method (with or without a forgetting budget), its settings from the run's config.json; a WiSE-FT
    or FAPM model (its raftune.json) one of ``wise(<label of the model it came from>)``. Its domain losses
    come from the training run (``training_outcome``); a post-hoc model has none here (no point drawn)."""
    by_model = {str(m.resolve()): label for label, r in runs.items() if (m := _model_folder(r))}
    members, outcomes = {}, {}
    for label, r in runs.items():
        model = _model_folder(r)
        if label == "base" or model is None:
            continue
        meta = _json_file(model / "raftune.json") or {}
        config = _json_file(model.parent / "config.json")
        if meta.get("method") in ("wise", "fapm"):
            tuned = str(meta.get("tuned_model"))
            source = by_model.get(str(Path(tuned).resolve())) or Path(tuned).parent.name
            members[label] = {"family": [meta["method"], tuned], "name": f"{meta['method']}({source})",
                              "settings": {k: meta[k] for k in ("alpha", "keep") if k in meta}}
        elif config is not None and "method" in config:
            budgeted = config.get("forgetting_budget") is not None
            settings = {k: config.get(k) for k in SWEPT if k in config}
            settings["lr"] = config.get("learning_rate", config.get("lr"))
            members[label] = {"family": [{k: config.get(k) for k in METHOD_KEYS}, budgeted],
                              "name": config["method"] + (" budget" if budgeted else ""), "settings": settings}
            outcomes[label] = training_outcome(model.parent)
    return {label: {**g, **outcomes.get(label, {})} for label, g in group_curves(members).items()}


def tradeoff(table: dict, runs: dict[str, dict], points: dict[str, dict] | None = None) -> dict:
    """The trade-off of every run: its curve and swept setting, its domain gain (the held-out domain loss
    of the base model minus its own, CE per answer token), its forgetting on each axis (``FORGETTING``: drift
    KL; 1 - IFEval strict retention vs the run labelled ``base``) and whether it is on the Pareto front of
    each axis (with the base at the origin). ``points``: label -> ``{"curve", "setting", "base_domain_loss",
    "domain_loss", "budget_met"}``, as ``raftune run`` gives them; default ``infer_points``. A value that cannot be had
    (no drift suite, a suite not comparable with the base's, no domain loss) is None, and no front is
    claimed without it."""
    points = infer_points(runs) if points is None else points
    base = runs.get("base")
    out, notes = {}, []
    for label, r in runs.items():
        if label == "base":
            out[label] = {"curve": "base", "setting": {}, "base_domain_loss": None, "domain_loss": None,
                          "budget_met": None, "domain_gain": 0.0, **dict.fromkeys(FORGETTING, 0.0)}
            continue
        p = points.get(label) or {}
        before, after = p.get("base_domain_loss"), p.get("domain_loss")
        gain = before - after if _finite(before) and _finite(after) else None
        drift = table["rows"][label].get("drift KL")
        if drift is not None and base is not None and isinstance(_suites(base).get("drift"), dict):
            verdict = suite_comparability(r, base, "drift", "base")
            if verdict["comparable"] is False:
                notes.append(f"`{label}`: drift KL not comparable with the base's ({'; '.join(verdict['why'])}); not drawn")
                drift = None
        kept = table["retention"].get(label, {}).get("IFEval strict")
        out[label] = {"curve": p.get("curve") or label, "setting": p.get("setting") or {}, "base_domain_loss": before,
                      "domain_loss": after, "budget_met": p.get("budget_met"), "domain_gain": gain, "drift KL": drift,
                      "IFEval strict forgetting": 1.0 - kept if kept is not None else None}
    befores = {label: p["base_domain_loss"] for label, p in out.items() if p["domain_gain"] is not None and label != "base"}
    if befores and max(befores.values()) - min(befores.values()) > _BASE_LOSS_RTOL * min(befores.values()):
        notes.append("the held-out losses the gains start from differ (" + ", ".join(f"{k} {v:.4g}" for k, v in befores.items())
                     + "): not all runs measured their domain loss on the same data, or from the same model")
    for note in notes:
        log.warning("trade-off: %s", note)
    return tradeoff_of(out, FORGETTING, notes)


def tradeoff_of(points: dict[str, dict], axes: Sequence[str], notes: Sequence[str] = ()) -> dict:
    """The trade-off of ``points`` (label -> ``{"curve", "setting", "domain_gain", <axis>: forgetting, ...}``,
    the base among them at the origin), as ``tradeoff`` returns it: each point's Pareto flag per axis
    (set in place; None where it lacks the axis or the gain, or where no front can be had), the front of
    each axis and the labels of each curve in order."""
    front = {}
    for axis in axes:
        xy = {label: (p[axis], p["domain_gain"]) for label, p in points.items()
              if p.get(axis) is not None and p["domain_gain"] is not None}
        front[axis] = pareto_front(xy) if len(xy) > 1 else []  # the base alone is no trade-off
        for label, p in points.items():
            p.setdefault("pareto", {})[axis] = (label in front[axis]) if label in xy and front[axis] else None
    curves: dict[str, list[str]] = {}
    for label, p in points.items():
        curves.setdefault(p["curve"], []).append(label)
    return {"axes": list(axes), "points": points, "curves": curves, "front": front, "notes": list(notes)}


def _tradeoff_markdown(t: dict) -> str:
    """The trade-off section of comparison.md: one row per run; empty where no run has a gain and a forgetting."""
    if not any(t["front"].values()):
        return ""
    axes = [a for a in t["axes"] if t["front"][a]]
    out = ("\n## Trade-off: domain gain vs forgetting\n\nDomain gain: held-out domain loss of the base model minus the "
           "run's (CE per answer token; higher learned more). Forgetting: " + "; ".join(
               {"drift KL": "drift KL per token (the drift suite)",
                "IFEval strict forgetting": "1 - IFEval strict retention vs base"}[a] for a in axes)
           + ". Pareto: the axes on which no other run, the base included, has at least as much gain for at most "
             "as much forgetting and is better on one.\n\n")
    out += ("| run | curve | setting | domain gain | " + " | ".join(a + (" (%)" if a != "drift KL" else "") for a in axes)
            + " | Pareto |\n")
    out += "|---" * (len(axes) + 5) + "|\n"
    for label, p in t["points"].items():
        cells = [_fmt(p["domain_gain"], False)] + [_fmt(p[a], a != "drift KL") for a in axes]
        on = [a.removesuffix(" forgetting") for a in axes if p["pareto"].get(a)]
        setting = format_setting(p["setting"]) + (" (budget not met)" if p["budget_met"] is False else "")
        out += f"| {label} | {p['curve']} | {setting} | " + " | ".join(cells) + f" | {', '.join(on) or '-'} |\n"
    return out + "".join(f"\nnote: {n}.\n" for n in t["notes"])


def plot_tradeoff(t: dict, out_dir: Path) -> Path | None:
    """``tradeoff_curves.png``: domain gain against each forgetting axis, one line per curve (its runs in
    order of forgetting, each marked with its swept setting), the base a star at the origin and the Pareto
    front a dashed staircase through ringed points. None where no run has a gain and a forgetting."""
    axes = [a for a in t["axes"] if t["front"][a]]
    if not axes:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(axes), figsize=(5.4 * len(axes), 4.2), squeeze=False)
    curves = [c for c in t["curves"] if c != "base"]
    for ax, axis in zip(panels[0], axes):
        for i, curve in enumerate(curves):
            pts = sorted(((p[axis], p["domain_gain"], p["setting"]) for label in t["curves"][curve]
                          if (p := t["points"][label])[axis] is not None and p["domain_gain"] is not None),
                         key=lambda pt: pt[:2])  # equal points keep their order: settings do not compare
            if not pts:
                continue
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", color=f"C{i % 10}", label=curve)
            for x, y, setting in pts:
                if setting:
                    ax.annotate(", ".join(format(v, "g") if _is_number(v) else str(v) for v in setting.values()),
                                (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i % 10}")
        front = sorted((t["points"][label][axis], t["points"][label]["domain_gain"]) for label in t["front"][axis])
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="grey", linestyle="--", linewidth=0.9)
        ax.scatter([x for x, _ in front], [y for _, y in front], s=130, facecolors="none", edgecolors="black",
                   linewidths=0.9, label="Pareto front", zorder=3)
        ax.scatter([0], [0], marker="*", s=140, color="black", label="base", zorder=4)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.axvline(0, color="grey", linewidth=0.5)
        ax.set_xlabel({"drift KL": "drift KL per token (vs base)", "IFEval strict forgetting": "1 - IFEval strict retention"}[axis])
        ax.set_ylabel("domain gain (held-out loss, base - run)")
        ax.set_title(f"Domain gain vs {axis}")
        ax.legend(fontsize=7)
    return _save(fig, Path(out_dir) / "tradeoff_curves.png")


def _default_label(arg: str | Path) -> str:
    path = Path(os.path.abspath(arg))  # "." and "..": the folder's own name; symlinks keep theirs
    return (path.parent if path.name == "results.json" else path).name.removeprefix("eval-")


def _check_labels(labels: list[str], run_args: list) -> None:
    seen = {}
    for label, arg in zip(labels, run_args):
        if not label.strip():
            raise CompareError(f"{arg}: empty label; pass --label with a name for each run")
        if label in seen:
            raise CompareError(f"labels must differ: {label!r} names both {seen[label]} and {arg}; "
                               "pass --label with a distinct name for each run, in order")
        seen[label] = arg


def compare(run_args: list[str | Path], labels: list[str] | None, out_dir: str | Path,
            points: dict[str, dict] | None = None) -> dict:
    """Check every input, then write comparison.md, comparison.json and the plots into ``out_dir``.
    ``points``: each run's curve, swept setting and domain losses (see ``tradeoff``); default: read from
    the files beside each evaluated model (``infer_points``)."""
    if not run_args:
        raise CompareError("no runs to compare: pass one or more eval run folders (or their results.json)")
    if labels and len(labels) != len(run_args):
        raise CompareError(f"{len(labels)} labels for {len(run_args)} runs: pass one --label per run, in order")
    labels = list(labels) if labels else [_default_label(a) for a in run_args]
    _check_labels(labels, run_args)
    runs = {label: load_result(a) for label, a in zip(labels, run_args)}
    out = Path(out_dir)
    if not (blocker := next(p for p in [out, *out.absolute().parents] if p.exists())).is_dir():
        raise CompareError(f"{blocker}: not a folder, so --out {out} cannot be made")
    table = build_table(runs)
    _warn_comparability(table)
    table["tradeoff"] = tradeoff(table, runs, points)
    # a folder of the user's (or another kind's output) is refused before anything is written into it
    outputs.claim(out, "compare", stable_hash([labels, [str(a) for a in run_args]], 16), other_key="redo")
    md = to_markdown(table) + _tradeoff_markdown(table["tradeoff"])
    atomic_write_text(out / "comparison.md", md)
    # strict JSON: every value read is finite and a ratio that overflows is None, so allow_nan=False never
    # raises; it keeps NaN and Infinity, which strict parsers refuse, out of the file for good
    atomic_write_text(out / "comparison.json", json.dumps(table, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    table["plots"] = [str(p) for p in [*plot_comparison(table, out, runs), plot_tradeoff(table["tradeoff"], out)] if p]
    table["markdown"] = md
    return table
