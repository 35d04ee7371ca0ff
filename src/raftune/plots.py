"""Training curves from a run's metrics.jsonl: losses, lambda, CE / (lambda * KL) (paper Figure 2), the
held-out domain loss and, beside it, the forgetting monitor's drift (with the budget) and the anchor's weight."""
from __future__ import annotations

import json
from pathlib import Path


def plot_training(metrics_path: Path, out_dir: Path, budget: float | None = None) -> Path | None:
    """Write ``training_curves.png`` into ``out_dir``, one panel per logged quantity; ``budget``: the
    forgetting budget, drawn as a line on the drift panel. None when no step was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "lr" in r]
    if not steps:
        return None
    panels = [("loss", [k for k in ("ce", "kl", "anchor_kl") if any(k in r for r in steps)]),
              ("lambda", ["lambda"] if any("lambda" in r for r in steps) else []),
              ("CE / (lambda KL)", ["ce_over_lambda_kl"] if any(r.get("ce_over_lambda_kl") for r in steps) else [])]
    panels = [p for p in panels if p[1]]
    if any("eval_domain_loss" in r for r in rows):
        panels.append(("held-out domain loss", ["eval_domain_loss"]))
    if any("drift_kl" in r for r in rows):
        panels.append(("drift KL(original || student)", ["drift_kl"]))
    if any("anchor_weight" in r for r in steps):
        panels.append(("anchor weight mu", ["anchor_weight"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            # measured points may sit on their own rows (step 0, the end); a step logged twice (a resumed run) counts once
            pts = sorted({r["step"]: r[k] for r in rows if r.get(k) is not None}.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, label=k)
        if title.startswith("CE /"):
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        if title.startswith("drift") and budget is not None:
            ax.axhline(budget, color="tab:red", linestyle="--", linewidth=0.8, label=f"budget {budget:g}")
            ax.legend()
        if title == "anchor weight mu":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    out = Path(out_dir) / "training_curves.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
