"""Training curves from a run's metrics.jsonl: losses, lambda, and CE / (lambda * KL) (paper Figure 2)."""
from __future__ import annotations

import json
from pathlib import Path


def plot_training(metrics_path: Path, out_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "lr" in r]
    if not steps:
        return None
    panels = [("loss", [k for k in ("ce", "kl") if any(k in r for r in steps)]),
              ("lambda", ["lambda"] if any("lambda" in r for r in steps) else []),
              ("CE / (lambda KL)", ["ce_over_lambda_kl"] if any(r.get("ce_over_lambda_kl") for r in steps) else [])]
    panels = [p for p in panels if p[1]]
    evals = [r for r in rows if "eval_domain_loss" in r]
    if evals:
        panels.append(("held-out domain loss", ["eval_domain_loss"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            src = evals if k == "eval_domain_loss" else steps
            pts = [(r["step"], r[k]) for r in src if r.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, label=k)
        if title.startswith("CE /"):
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    out = Path(out_dir) / "training_curves.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
