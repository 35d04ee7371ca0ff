"""``raftune compare``: evaluation runs side by side, shaped like the paper's Table 1 and Table 4.

    raftune compare runs/eval-base runs/eval-sft runs/eval-raft --out runs/compare

Each argument is an eval run folder (or its results.json). Every input is checked before anything is
built or written (``load_result``): a file that is not an eval run's results.json, or holds a value
of the wrong type where the table reads one, stops the comparison with a ``CompareError`` naming the
file (and the key). An evaluation that had not finished (``"complete": false``) is tabled with a
warning, its label marked ``(incomplete)`` and a footnote naming its missing suites.

Rows are the runs (labelled by ``--label`` or the folder name); columns are D-Acc and each general
metric, with the change vs the run labelled ``sft`` when there is one (Table 1), and the retention of
every general metric vs the run labelled ``base`` (Table 4). Written as Markdown and JSON, with
plots: retention bars, the trade-off scatter (D-Acc vs mean general retention), and the training
curves (CE, KL, lambda) of the runs whose model came from ``raftune train``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from raftune.files import atomic_write_json, atomic_write_text, read_jsonl_log

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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(results: dict, path: tuple[str, ...]):
    node = results.get("suites", results)  # an eval run's results.json keeps its suites under "suites"
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if _is_number(node) else None


# --- reading and checking the inputs -------------------------------------------------------------------------

# keys every results.json of ``raftune eval`` has held ("complete" and "settings" came later: optional here)
REQUIRED_KEYS = ("suites", "config")


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
    tabled = dict.fromkeys(path[0] for _, path, _ in [DOMAIN, *GENERAL, *OTHER])
    if not tabled.keys() & suites.keys():
        raise CompareError(f"{path}: suites: none of the suites compare tables ({', '.join(tabled)}); "
                           f"found: {', '.join(suites) or 'none'}")
    for _, (suite, metric), _ in [DOMAIN, *GENERAL, *OTHER]:
        if suite not in suites:
            continue
        if not isinstance(suites[suite], dict):
            fail(f"suites.{suite}", "an object", suites[suite])
        value = suites[suite].get(metric)
        if value is not None and not _is_number(value):
            fail(f"suites.{suite}.{metric}", "a number", value)
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


def build_table(runs: dict[str, dict]) -> dict:
    """{"columns": [...], "rows": {label: {column: value}}, "retention": {label: {column: ratio}},
    "incomplete": {label: [missing suites]}} (the runs whose results.json says ``"complete": false``)."""
    columns = [c for c in [DOMAIN, *GENERAL, *OTHER] if any(_get(r, c[1]) is not None for r in runs.values())]
    rows = {label: {name: _get(r, path) for name, path, _ in columns} for label, r in runs.items()}
    base = rows.get("base")
    retention = {}
    if base:
        for label, row in rows.items():
            retention[label] = {name: (row[name] / base[name] if row[name] is not None and base[name] else None)
                                for name, _, _ in GENERAL if name in row}
    incomplete = {label: _missing_suites(r) for label, r in runs.items() if r.get("complete") is False}
    return {"columns": [c[0] for c in columns], "rows": rows, "retention": retention, "incomplete": incomplete}


def _shown(label: str, table: dict) -> str:
    """A run's label as printed and plotted: marked where its evaluation had not finished."""
    return f"{label} (incomplete)" if label in table.get("incomplete", {}) else label


def _fmt(v, pct: bool) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.4g}"


def to_markdown(table: dict) -> str:
    cols = table["columns"]
    pct = {c: c in ("D-Acc", "IFEval strict", "IFEval loose", "MMLU", "General win rate") for c in cols}
    ref = table["rows"].get("sft")
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, row in table["rows"].items():
        cells = []
        for c in cols:
            cell = _fmt(row[c], pct[c])
            if ref and label != "sft" and row[c] is not None and ref[c] is not None:
                delta = (row[c] - ref[c]) * (100 if pct[c] else 1)
                cell += f" ({delta:+.1f} vs SFT)" if pct[c] else f" ({delta:+.3g} vs SFT)"
            cells.append(cell)
        lines.append(f"| {_shown(label, table)} | " + " | ".join(cells) + " |")
    out = "## Results (Table 1 shape)\n\nPercentages for accuracies; change vs the run labelled `sft` in brackets.\n\n"
    out += "\n".join(lines) + "\n"
    for label, missing in table.get("incomplete", {}).items():
        out += (f"\n(incomplete) `{label}`: its evaluation had not finished (`\"complete\": false`); "
                + (f"missing suite(s): {', '.join(missing)}. " if missing else "")
                + "Not a final result: rerun its `raftune eval` to finish it.\n")
    gcols = [c for c, _, _ in GENERAL if any(r.get(c) is not None for r in table["retention"].values())]
    if gcols:  # retention exists only for general metrics
        out += "\n## Retention vs base (Table 4 shape)\n\n| method | " + " | ".join(gcols) + " |\n"
        out += "|---" * (len(gcols) + 1) + "|\n"
        for label, r in table["retention"].items():
            cells = ["-" if r.get(c) is None else f"{100 * r[c]:.1f}%" for c in gcols]
            out += f"| {_shown(label, table)} | " + " | ".join(cells) + " |\n"
    return out


def plot_comparison(table: dict, out_dir: Path, runs_by_label: dict[str, dict] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ret = table["retention"]
    labels = dict.fromkeys([*table["rows"], *(runs_by_label or {})])
    color = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per run in every plot
    gcols = [c for c, _, _ in GENERAL if any(r.get(c) is not None for r in ret.values())]
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
    model = (results.get("config") or {}).get("model")
    if not isinstance(model, str) or not model or not Path(model).is_dir():  # a hub id, "default", a server
        return []
    path = Path(model).parent / "metrics.jsonl"
    try:
        rows = read_jsonl_log(path, repair=False)  # a line cut off by a crash is skipped
    except (OSError, ValueError) as e:
        log.warning("%s: no training curves (%s)", path, e)
        return []
    return [row for row in rows if isinstance(row, dict) and "lr" in row and _is_number(row.get("step"))]


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


def compare(run_args: list[str | Path], labels: list[str] | None, out_dir: str | Path) -> dict:
    """Check every input, then write comparison.md, comparison.json and the plots into ``out_dir``."""
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
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(table)
    atomic_write_text(out / "comparison.md", md)
    atomic_write_json(out / "comparison.json", table)
    table["plots"] = [str(p) for p in plot_comparison(table, out, runs)]
    table["markdown"] = md
    return table
