"""``raftune compare``: evaluation runs side by side, shaped like the paper's Table 1 and Table 4.

    raftune compare runs/eval-base runs/eval-sft runs/eval-raft --out runs/compare

Each argument is an eval run folder (or its results.json). Rows are the runs (labelled by
``--label`` or the folder name); columns are D-Acc and each general metric, with the change vs the
run labelled ``sft`` when there is one (Table 1), and the retention of every general metric vs the
run labelled ``base`` (Table 4). Written as Markdown and JSON, with plots: retention bars, the
trade-off scatter (D-Acc vs mean general retention), and the training curves (CE, KL, lambda) of the
runs whose model came from ``raftune train``.
"""
from __future__ import annotations

import json
from pathlib import Path

from raftune.files import atomic_write_json, atomic_write_text

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


def _get(results: dict, path: tuple[str, ...]):
    node = results.get("suites", results)  # an eval run's results.json keeps its suites under "suites"
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def load_results(arg: str | Path) -> dict:
    path = Path(arg)
    path = path / "results.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results.json (is it an eval run folder?)")
    return json.loads(path.read_text())


def build_table(runs: dict[str, dict]) -> dict:
    """{"columns": [...], "rows": {label: {column: value}}, "retention": {label: {column: ratio}}}."""
    columns = [c for c in [DOMAIN, *GENERAL, *OTHER] if any(_get(r, c[1]) is not None for r in runs.values())]
    rows = {label: {name: _get(r, path) for name, path, _ in columns} for label, r in runs.items()}
    base = rows.get("base")
    retention = {}
    if base:
        for label, row in rows.items():
            retention[label] = {name: (row[name] / base[name] if row[name] is not None and base[name] else None)
                                for name, _, _ in GENERAL if name in row}
    return {"columns": [c[0] for c in columns], "rows": rows, "retention": retention}


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
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out = "## Results (Table 1 shape)\n\nPercentages for accuracies; change vs the run labelled `sft` in brackets.\n\n"
    out += "\n".join(lines) + "\n"
    gcols = [c for c, _, _ in GENERAL if any(r.get(c) is not None for r in table["retention"].values())]
    if gcols:  # retention exists only for general metrics
        out += "\n## Retention vs base (Table 4 shape)\n\n| method | " + " | ".join(gcols) + " |\n"
        out += "|---" * (len(gcols) + 1) + "|\n"
        for label, r in table["retention"].items():
            out += f"| {label} | " + " | ".join("-" if r.get(c) is None else f"{100 * r[c]:.1f}%" for c in gcols) + " |\n"
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
            ax.bar([j + i * width for j in range(len(gcols))], [100 * (r.get(c) or 0) for c in gcols], width, label=label,
                   color=color[label])
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
                ax.annotate(label, (100 * d, 100 * g), textcoords="offset points", xytext=(4, 4))
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
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, color=color[label])
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
    """The per-step training metrics of the model an eval run evaluated, when it came from `raftune train`."""
    model = Path(str(results.get("config", {}).get("model", "")))
    path = model.parent / "metrics.jsonl"
    if not model.name or not path.exists():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if "lr" in row]


def compare(run_args: list[str | Path], labels: list[str] | None, out_dir: str | Path) -> dict:
    if labels and len(labels) != len(run_args):
        raise ValueError(f"{len(labels)} labels for {len(run_args)} runs")
    labels = labels or [Path(a).name.removeprefix("eval-") for a in run_args]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must differ: {labels}")
    runs = {label: load_results(a) for label, a in zip(labels, run_args)}
    table = build_table(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(table)
    atomic_write_text(out / "comparison.md", md)
    atomic_write_json(out / "comparison.json", table)
    table["plots"] = [str(p) for p in plot_comparison(table, out, runs)]
    table["markdown"] = md
    return table
