"""The forgetting monitor, the anchor lever and the forgetting budget, measured on MedQuAD with LoRA.

    python benchmarks/forgetting_budget.py --quick                       # every part at a tiny size, minutes on CPU
    python benchmarks/forgetting_budget.py --out docs/forgetting-budget  # the CPU size of issue 16 (about an hour on 2 cores)
    python benchmarks/forgetting_budget.py --device cuda --steps 200 --batch-size 16 --rollout-tokens 128 \\
        --train-limit 3200 --heldout 200 --monitor-every 10                # a GPU size

Every run goes through the real trainer (``raftune.train.train``) on the embedded SmolLM2-135M-Instruct
(``--model``) with LoRA, on MedQuAD questions (``--data``) split into training rows and disjoint
held-out rows. Parts:

(a) SFT and RAFT with the monitor on: the drift KL(original || student) at every monitor step.
(b) The levers at three fixed settings each (``--lever-method``, default sft): the anchor's weight mu
    (``anchor_weight``, no controller) and the learning rate. Drift must fall as mu grows (rise with lr).
(c) SFT and RAFT at two forgetting budgets each (``--budgets``, or fractions ``--budget-fractions`` of
    each method's own drift in (a)): the mean drift after the controller's warm-up against the budget
    (target: within +25%), whether the run met it, the step model/ holds and its held-out domain loss (a
    looser budget should buy more domain learning).
(d) The monitor's cost: seconds per measurement against seconds per training step, as its share of
    training wall time at the default ``monitor_every`` (target <= 5%) and at this run's; the one-time
    cost of the original's answers; and the anchor's cost per step.
(e) WiSE-FT of the SFT model at three alphas, and whether budgeted SFT or RAFT beats it at equal drift.

Every saved model (and each WiSE-FT mix) is measured the same way afterwards: the drift suite's
``forgetting.drift`` on the monitor's prompts and the base model's answers, and the held-out domain
loss. Writes ``results.json``, ``results.md`` (the tables, and the trade-off table of every point) and
``tradeoff_curves.png`` (``raftune compare``'s trade-off plot of them) into ``--out``, the runs under
``--out/runs``.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medquad" / "qa.jsonl.gz"
QUICK = dict(steps=4, batch_size=2, rollout_tokens=8, train_limit=32, heldout=4, max_len=256, monitor_limit=4,
             monitor_tokens=16, monitor_every=2, budget_warmup=2, budget_monitor_every=2)


def split_medquad(data: Path, out: Path, n_train: int, n_heldout: int, seed: int) -> tuple[Path, Path]:
    """Training and held-out files of disjoint MedQuAD questions (a seeded shuffle; a question is held
    out with all of its answers, so no held-out question is ever trained on)."""
    from raftune.data import load_qa

    examples = load_qa(str(data))[0]
    questions = sorted({ex.question for ex in examples})
    random.Random(seed).shuffle(questions)
    held = set(questions[:n_heldout])
    train_rows = [ex for ex in examples if ex.question not in held]
    random.Random(seed + 1).shuffle(train_rows)
    heldout_rows = [ex for ex in examples if ex.question in held]
    heldout_rows = list({ex.question: ex for ex in heldout_rows}.values())  # one answer per held-out question
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "heldout.jsonl"
    for path, rows in zip(paths, (train_rows[:n_train], heldout_rows)):
        path.write_text("".join(json.dumps({"question": ex.question, "answer": ex.answer}) + "\n" for ex in rows))
    return paths


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def by_step(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics(run) if r.get(key) is not None}


class Measure:
    """Drift (the drift suite's computation) and held-out domain loss of saved models, all measured alike."""

    def __init__(self, base: str, answers_file: Path, heldout: Path, max_len: int, device: str):
        from raftune.data import load_qa
        from raftune.models import load_model_and_tokenizer
        from raftune.sequences import end_of_turn_id

        self.base, self.tok = load_model_and_tokenizer(base, device=device, dtype="fp32")
        rows = json.loads(answers_file.read_text())["rows"]
        self.prompts, self.answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
        self.heldout, self.max_len, self.device = load_qa(str(heldout))[0], max_len, device
        self.eot = end_of_turn_id(self.tok, self.base.generation_config)

    def __call__(self, model_dir: Path) -> dict:
        from raftune.forgetting import drift
        from raftune.models import load_model_and_tokenizer
        from raftune.train import TokenLosses, domain_loss

        model = load_model_and_tokenizer(str(model_dir), device=self.device, dtype="fp32")[0]
        d = drift(self.base, model, self.tok, self.prompts, self.answers)["kl_base_to_tuned"]
        loss = domain_loss(TokenLosses(model), self.tok, self.heldout, 8, self.max_len, self.eot)
        return {"drift": d, "heldout_loss": loss}

    def base_loss(self) -> float:
        from raftune.train import TokenLosses, domain_loss

        return domain_loss(TokenLosses(self.base), self.tok, self.heldout, 8, self.max_len, self.eot)


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """The y of the piecewise-linear curve through ``points`` (x sorted) at ``x``; None outside it."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every part at a tiny size (a check that it runs)")
    p.add_argument("--model", default="default")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default="runs/bench-forgetting-budget")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rollout-tokens", type=int, default=32)
    p.add_argument("--train-limit", type=int, default=400, help="training rows")
    p.add_argument("--heldout", type=int, default=48, help="held-out questions (disjoint from training)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--monitor-limit", type=int, default=32, help="the default size: (d) measures its cost")
    p.add_argument("--monitor-tokens", type=int, default=128)
    p.add_argument("--monitor-every", type=int, default=4)
    p.add_argument("--anchor-batch", type=int, default=4)
    p.add_argument("--lever-method", default="sft")
    p.add_argument("--lever-weights", default="1,10,100", help="three fixed anchor weights mu")
    p.add_argument("--lever-lrs", default="0.25,0.5,1", help="three learning rates, as multiples of --lr")
    p.add_argument("--budgets", default=None, help="two budgets per method, e.g. 0.02,0.04 (default: --budget-fractions)")
    p.add_argument("--budget-fractions", default="0.5,0.8", help="budgets as fractions of each method's free drift in (a)")
    p.add_argument("--budget-warmup", type=int, default=6)
    p.add_argument("--budget-derivative", type=float, default=1.0, help="the controller's k_d (0: plain dual ascent)")
    p.add_argument("--budget-monitor-every", type=int, default=2,
                   help="the budget runs' monitor_every: the controller acts at each measurement, and a run of a few "
                        "dozen steps needs more than a handful of them (the trainer's default is 10, for long runs)")
    p.add_argument("--wise-alphas", default="0.25,0.5,0.75")
    p.add_argument("--parts", default="abcde", help="which parts to run (c and e need a)")
    p.add_argument("--levers-from", default=None, metavar="RESULTS_JSON",
                   help="without part b: take (b) from an earlier results.json made at the same settings (its runs have "
                        "no budget, so the budget's settings do not change them); refused where a setting differs or its "
                        "part (a) SFT run does not reproduce")
    p.add_argument("--report", action="store_true", help="only rewrite results.md and the plot from --out's results.json")
    args = p.parse_args()
    if args.report:
        return write_report(json.loads((Path(args.out) / "results.json").read_text()), Path(args.out))
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if not Path(args.data).exists():
        sys.exit(f"{args.data}: no such file (MedQuAD: ../shared/data/medquad/qa.jsonl.gz)")

    from raftune.train import MONITOR_EVERY, TrainConfig, train

    out = Path(args.out)
    train_file, heldout_file = split_medquad(Path(args.data), out / "data", args.train_limit, args.heldout, seed=0)
    common = dict(data=str(train_file), model=args.model, out_dir=str(out / "runs"), lora=True, batch_size=args.batch_size,
                  max_steps=args.steps, max_len=args.max_len, max_reference_tokens=384, rollout_max_new_tokens=args.rollout_tokens,
                  eval_data=str(heldout_file), eval_limit=args.heldout, monitor_limit=args.monitor_limit,
                  monitor_max_new_tokens=args.monitor_tokens, monitor_every=args.monitor_every, anchor_batch=args.anchor_batch,
                  save_every=10**6, device=args.device, lr=args.lr)
    results: dict = {"settings": {k: v for k, v in vars(args).items()}, "monitor_every_default": MONITOR_EVERY}
    runs: dict[str, Path] = {}
    made: dict[str, tuple[str, Path]] = {}  # settings -> (first label, run): a lever setting equal to (a)'s run is that run
    where: dict[str, dict] = {}  # label -> the curve it is a point of and its setting there, or the label it is the same as

    def run(label: str, curve: str, setting: dict, **kw) -> Path:
        key = json.dumps({**common, **kw}, sort_keys=True)
        if key in made:
            where[label] = {"same_as": made[key][0]}
            runs[label] = made[key][1]
            return runs[label]
        where[label] = {"curve": curve, "setting": setting}
        t0 = time.perf_counter()
        runs[label] = train(TrainConfig(**{**common, **kw}), progress=False)
        made[key] = label, runs[label]
        print(f"  {label}: {time.perf_counter() - t0:.0f} s  drift per step "
              + " ".join(f"{s}:{v:.4f}" for s, v in by_step(runs[label], "drift_kl").items()), flush=True)
        return runs[label]

    # --- (a) the monitor during SFT and RAFT
    if "a" in args.parts or "c" in args.parts or "e" in args.parts:
        print("(a) monitor", flush=True)
        for method in ("sft", "raft"):  # the lever method's run is also its lr curve's point at --lr
            run(method, *((f"{method} (lr)", {"lr": args.lr}) if method == args.lever_method
                          else (f"{method} (budget)", {"budget": "off"})), method=method)
        results["monitor"] = {m: by_step(runs[m], "drift_kl") for m in ("sft", "raft")}
        results["runs_a"] = {m: {"drift": by_step(runs[m], "drift_kl")[args.steps],
                                 "heldout_loss": by_step(runs[m], "eval_domain_loss")[args.steps]} for m in ("sft", "raft")}
    measure = Measure(args.model, next(iter(runs.values()), out) / "monitor_answers.json", heldout_file, args.max_len,
                      args.device) if runs else None

    # --- (b) the levers at three fixed settings
    if "b" in args.parts:
        print("(b) levers", flush=True)
        lever = {"anchor_weight": [], "lr": []}
        for mu in [float(x) for x in args.lever_weights.split(",")]:
            r = run(*lever_point(args.lever_method, "anchor_weight", mu), method=args.lever_method, anchor_weight=mu)
            lever["anchor_weight"].append({"setting": mu, "drift": by_step(r, "drift_kl")[args.steps],
                                           "heldout_loss": by_step(r, "eval_domain_loss")[args.steps]})
        for f in [float(x) for x in args.lever_lrs.split(",")]:
            r = run(*lever_point(args.lever_method, "lr", f * args.lr), method=args.lever_method,
                    **({"lr": f * args.lr} if f != 1 else {}))
            lever["lr"].append({"setting": f * args.lr, "drift": by_step(r, "drift_kl")[args.steps],
                                "heldout_loss": by_step(r, "eval_domain_loss")[args.steps]})
        for name, pts in lever.items():
            d = [pt["drift"] for pt in pts]
            mono = all(a > b for a, b in zip(d, d[1:])) if name == "anchor_weight" else all(a < b for a, b in zip(d, d[1:]))
            lever[name] = {"points": pts, "monotone": mono}
        results["levers"] = lever
    elif args.levers_from:
        levers_from(results, Path(args.levers_from), args)

    # --- (c) budgets
    if "c" in args.parts:
        print("(c) budgets", flush=True)
        results["budgets"] = []
        for method in ("sft", "raft"):
            free = by_step(runs[method], "drift_kl")[args.steps]
            budgets = ([float(b) for b in args.budgets.split(",")] if args.budgets else
                       [float(f"{f * free:.3g}") for f in map(float, args.budget_fractions.split(","))])
            for b in budgets:
                r = run(f"{method} B={b:g}", f"{method} (budget)", {"budget": b}, method=method, forgetting_budget=b,
                        budget_warmup=args.budget_warmup, budget_derivative=args.budget_derivative,
                        monitor_every=args.budget_monitor_every or args.monitor_every)
                # after the controller's first update (at the first measurement from budget_warmup on)
                after = [v for s, v in by_step(r, "drift_kl").items() if s > args.budget_warmup] or [by_step(r, "drift_kl")[args.steps]]
                chosen = json.loads((r / "config.json").read_text())["budget"]
                results["budgets"].append({
                    "method": method, "budget": b, "free_drift": free, "mean_drift_after_warmup": statistics.mean(after),
                    "max_drift_after_warmup": max(after), "ratio_to_budget": statistics.mean(after) / b, "met": chosen["met"],
                    "model_step": chosen["step"], "anchor_weight_final": chosen["anchor_weight_final"],
                    **measure(r / "model")})

    # --- (d) the monitor's cost
    if "a" in args.parts:
        cost = {}
        for method in ("sft", "raft"):
            rows = metrics(runs[method])
            step_s = statistics.median(r["rollout_s"] + r["other_s"] for r in rows if "lr" in r)
            measure_s = statistics.median(r["monitor_s"] for r in rows if "monitor_s" in r and r["step"] > 0)
            cost[method] = {"step_s": step_s, "measure_s": measure_s, "answers_s": rows[0].get("monitor_answers_s"),
                            "share_at_default": measure_s / (MONITOR_EVERY * step_s + measure_s),
                            "share_at_this_run": measure_s / (args.monitor_every * step_s + measure_s)}
        if "b" in args.parts:  # the anchor's cost: a step with it against one without (mu=0 is (a)'s run)
            first_mu = lever_point(args.lever_method, "anchor_weight", float(args.lever_weights.split(",")[0]))[0]
            anchored = statistics.median(r["rollout_s"] + r["other_s"] for r in metrics(runs[first_mu]) if "lr" in r)
            cost["anchor_step_over_plain"] = anchored / cost[args.lever_method]["step_s"]
        elif "anchor_step_over_plain" in results.get("levers_cost", {}):
            cost["anchor_step_over_plain"] = results.pop("levers_cost")["anchor_step_over_plain"]
        results["cost"] = cost

    # --- (e) WiSE-FT of SFT, and the comparison at equal drift
    if "e" in args.parts:
        from raftune.posthoc import wise

        print("(e) WiSE-FT", flush=True)
        alphas = [float(a) for a in args.wise_alphas.split(",")]
        mixes = wise(args.model, str(runs["sft"] / "model"), str(out / "wise"), alphas)
        results["wise"] = [{"alpha": a, **measure(m)} for a, m in zip(alphas, mixes)]
        results["wise"].append({"alpha": 1.0, **measure(runs["sft"] / "model")})
        curve = [(0.0, measure.base_loss())] + [(w["drift"], w["heldout_loss"]) for w in results["wise"]]
        results["base_heldout_loss"] = curve[0][1]
        for b in results.get("budgets", []):
            at = interpolate(curve, b["drift"])
            b["wise_loss_at_equal_drift"] = at
            b["beats_wise"] = None if at is None else b["heldout_loss"] < at

    # every run's last measured point (the monitor's drift and the held-out loss at its last step), its curve
    # and setting; a label whose settings were an earlier label's run is that run, and says so
    results["runs"] = {label: {"dir": str(r), "drift": by_step(r, "drift_kl")[args.steps],
                               "heldout_loss": by_step(r, "eval_domain_loss")[args.steps], **where[label]}
                       for label, r in runs.items()} | results.pop("lever_runs", {})
    results.pop("runs_a", None)  # in "runs" too
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out)


# settings that do not change part (b)'s runs: where it is written, which parts run, and the budget's settings
NOT_LEVERS = {"quick", "out", "parts", "report", "levers_from", "budgets", "budget_fractions", "budget_warmup",
              "budget_derivative", "budget_monitor_every", "wise_alphas"}
def lever_point(method: str, lever: str, value: float) -> tuple[str, str, dict]:
    """A lever run's label, its curve and its setting there (part b's runs, and those --levers-from takes)."""
    if lever == "anchor_weight":
        return f"{method} mu={value:g}", f"{method} + anchor (fixed mu)", {"mu": value}
    return f"{method} lr={value:g}", f"{method} (lr)", {"lr": value}


REPRODUCED_REL = 1e-5  # part (a)'s SFT run, drift and held-out loss, against the earlier file's: fp32 rounding only


def levers_from(results: dict, path: Path, args) -> None:
    """Part (b) of an earlier results.json into ``results``: its levers, its lever runs and the anchor's cost,
    after checking that it was made at the same settings and that its (a) SFT run (the lr curve's point at --lr)
    is the one this run just made, drift and held-out loss equal up to fp32 rounding."""
    if "runs_a" not in results:
        sys.exit("--levers-from checks the earlier file against this run's part (a): run part a (or c or e) too")
    old = json.loads(path.read_text())
    if "levers" not in old:
        sys.exit(f"{path}: no part (b) ('levers') to take")
    differ = {k: (old["settings"].get(k), v) for k, v in results["settings"].items()
              if k not in NOT_LEVERS and old["settings"].get(k) != v}
    if differ:
        sys.exit(f"{path}: made at other settings, so its part (b) is not this run's: "
                 + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in differ.items()))
    mine, theirs = results["runs_a"]["sft"], old["runs"]["sft"]
    # another machine's CPU kernels round fp32 reductions differently (measured: drift 0.027219766 there and
    # 0.027219728 here, rel 1.4e-6, held-out loss rel 3e-8): equal up to that, not a different run
    rel = {k: abs(mine[k] - theirs[k]) / abs(theirs[k]) for k in ("drift", "heldout_loss")}
    if max(rel.values()) > REPRODUCED_REL:
        sys.exit(f"{path}: its part (a) SFT run ended at drift {theirs['drift']!r}, held-out loss {theirs['heldout_loss']!r}; "
                 f"this one at {mine['drift']!r}, {mine['heldout_loss']!r}: not reproduced (relative difference over "
                 f"{REPRODUCED_REL:g}), so run part b here")
    results["levers"] = old["levers"]
    # each lever point as run() labels it, on its curve (a file older than the curves in "runs" has its points only)
    lm, lever_runs = args.lever_method, {}
    for name, lev in old["levers"].items():
        for pt in lev["points"]:
            label, curve, setting = lever_point(lm, name, pt["setting"])
            # the lr point at --lr is (a)'s run, made here
            where = {"same_as": lm} if name == "lr" and pt["setting"] == args.lr else {"curve": curve, "setting": setting}
            lever_runs[label] = {"dir": old["runs"].get(label, {}).get("dir"), "drift": pt["drift"],
                                 "heldout_loss": pt["heldout_loss"], **where, "from": str(path)}
    results["lever_runs"] = lever_runs
    if "anchor_step_over_plain" in old.get("cost", {}):
        results["levers_cost"] = {"anchor_step_over_plain": old["cost"]["anchor_step_over_plain"]}
    results["levers_from"] = (f"taken from {path}: the same settings, its part (a) SFT run reproduced here (drift "
                              f"{mine['drift']:.6f}, held-out loss {mine['heldout_loss']:.6f}; relative differences "
                              f"{rel['drift']:.1e} and {rel['heldout_loss']:.1e}, fp32 rounding); (b) has no budget, "
                              "so the budget's settings do not change it")


def write_report(results: dict, out: Path) -> None:
    """results.md (the tables) and tradeoff_curves.png (``raftune compare``'s plot of the same points)."""
    from raftune.compare import _tradeoff_markdown, plot_tradeoff

    text = markdown(results)
    t = tradeoff_view(results)
    if t is not None:
        text += "\n" + _tradeoff_markdown(t)
        plot_tradeoff(t, out)
    (out / "results.md").write_text(text + "\n")
    print(text)


def tradeoff_view(r: dict) -> dict | None:
    """The points of every part as ``raftune.compare.tradeoff`` gives them (drift KL axis only): domain gain
    = base held-out loss - the model's; runs at their last step, budgeted runs by the model/ they saved,
    WiSE-FT mixes measured. None without the base's held-out loss (part e)."""
    from raftune.compare import tradeoff_of

    base = r.get("base_heldout_loss")
    if base is None or "runs" not in r:
        return None
    pts = {"base": {"curve": "base", "setting": {}, "drift": 0.0, "heldout_loss": base, "met": None}}
    pts |= {label: {**run, "met": None} for label, run in r["runs"].items() if "same_as" not in run}
    for b in r.get("budgets", []):  # the same labels as their runs: each by the model/ it saved
        label = f"{b['method']} B={b['budget']:g}"
        pts[label] = {**pts[label], "drift": b["drift"], "heldout_loss": b["heldout_loss"], "met": b["met"]}
    for w in r.get("wise", []):
        if w["alpha"] < 1:
            pts[f"wise-ft a={w['alpha']:g}"] = {"curve": f"wise-ft of {r['settings']['lever_method']}",
                                                "setting": {"alpha": w["alpha"]}, "met": None, **w}
    axis = "drift KL"
    points = {label: {"curve": p["curve"], "setting": p["setting"], "base_domain_loss": base, "domain_loss": p["heldout_loss"],
                      "budget_met": p["met"], "domain_gain": base - p["heldout_loss"], axis: p["drift"]}
              for label, p in pts.items()}
    return tradeoff_of(points, [axis])


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"Forgetting monitor and budget: {s['model']} with LoRA on MedQuAD, {s['steps']} steps at batch {s['batch_size']}, "
             f"lr {s['lr']:g}, {s['rollout_tokens']} rollout tokens, held-out loss on {s['heldout']} questions, drift on "
             f"{s['monitor_limit']} built-in monitor prompts (answers up to {s['monitor_tokens']} tokens), measured every "
             f"{s['monitor_every']} steps, on {s['device']}.", ""]
    if "monitor" in r:
        lines += ["(a) drift KL per token by step", "", "| method | " + " | ".join(f"step {k}" for k in r["monitor"]["sft"]) + " |",
                  "|---|" + "---|" * len(r["monitor"]["sft"])]
        lines += [f"| {m} | " + " | ".join(f"{v:.4f}" for v in r["monitor"][m].values()) + " |" for m in r["monitor"]]
        lines.append("")
    if "levers" in r:
        lines += [f"(b) levers, {s['lever_method']}, fixed settings", "", "| lever | setting | drift | held-out loss |", "|---|---|---|---|"]
        for name, lev in r["levers"].items():
            lines += [f"| {name} | {pt['setting']:g} | {pt['drift']:.4f} | {pt['heldout_loss']:.4f} |" for pt in lev["points"]]
        lines += ["", "monotone: " + ", ".join(f"{n} {'yes' if lev['monotone'] else 'no'}" for n, lev in r["levers"].items()), ""]
        if "levers_from" in r:
            lines += [f"(b) is {r['levers_from']}", ""]
    if "budgets" in r:
        lines += [f"(c) budgets (drift after warm-up, model/ measured afterwards; the controller's k_d "
                  f"{s.get('budget_derivative', 0.0):g}, warm-up {s['budget_warmup']} steps, a measurement every "
                  f"{s['budget_monitor_every']} steps)", "",
                  "| method | budget | free drift | mean drift after warm-up | / budget | met | model/ step | model/ drift | "
                  "model/ held-out loss | WiSE-FT of SFT at equal drift | beats WiSE-FT |", "|---|" + "---|" * 10]
        for b in r["budgets"]:
            wl = b.get("wise_loss_at_equal_drift")
            lines.append(f"| {b['method']} | {b['budget']:g} | {b['free_drift']:.4f} | {b['mean_drift_after_warmup']:.4f} | "
                         f"{b['ratio_to_budget']:.2f} | {'yes' if b['met'] else 'no'} | {b['model_step']} | {b['drift']:.4f} | "
                         f"{b['heldout_loss']:.4f} | {'n/a' if wl is None else f'{wl:.4f}'} | "
                         f"{'n/a' if b.get('beats_wise') is None else 'yes' if b['beats_wise'] else 'no'} |")
        lines.append("")
    if "cost" in r:
        c = r["cost"]
        lines += ["(d) monitor cost", "", "| method | s per step | s per measurement | answers (once) s | share at default "
                  f"(every {r['monitor_every_default']}) | share at every {s['monitor_every']} |", "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {c[m]['step_s']:.2f} | {c[m]['measure_s']:.2f} | {c[m]['answers_s'] or 0:.1f} | "
                  f"{100 * c[m]['share_at_default']:.1f}% | {100 * c[m]['share_at_this_run']:.1f}% |" for m in ("sft", "raft")]
        if "anchor_step_over_plain" in c:
            lines += ["", f"anchor: a step with it takes {c['anchor_step_over_plain']:.2f}x one without"]
        lines.append("")
    if "wise" in r:
        lines += [f"(e) WiSE-FT of SFT (base held-out loss {r['base_heldout_loss']:.4f})", "", "| alpha | drift | held-out loss |",
                  "|---|---|---|"] + [f"| {w['alpha']:g} | {w['drift']:.4f} | {w['heldout_loss']:.4f} |" for w in r["wise"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
