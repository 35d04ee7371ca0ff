"""`raftune run`: refine then train from one config, on a tiny random model."""
import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from raftune.cli import app


def test_run_refines_then_trains_each_method(tmp_path, tiny_model_dir):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What does g{i} do?", "answer": f"g{i} adds {i}."}) + "\n"
                            for i in range(12)))
    cfg = {
        "refine": {"data": str(data), "out_dir": str(tmp_path / "runs"), "model": str(tiny_model_dir),
                   "judges": [str(tiny_model_dir)], "max_new_tokens": 6, "judge_max_new_tokens": 4, "rounds": 1,
                   "tau": -1.0, "test_fraction": 0.25, "device": "cpu"},
        "train": {"batch_size": 3, "max_steps": 2, "rollout_max_new_tokens": 4, "top_k": 8, "device": "cpu"},
        "methods": ["raft", "sft", {"name": "raft-chat", "method": "raft", "teacher_context": "chat"}],
        "eval": {"suites": ["domain", "weights"], "max_new_tokens": 4, "judge_max_new_tokens": 4, "judge_retries": 0,
                 "device": "cpu"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--set", "train.lr=0.001"])
    assert result.exit_code == 0, result.output
    refine_dir = next((tmp_path / "runs").glob("refine-*"))
    summary = json.loads((refine_dir / "pipeline.json").read_text())
    assert set(summary["methods"]) == {"raft", "sft", "raft-chat"}
    for m, r in summary["methods"].items():
        assert r["base_domain_loss"] > 0 and r["domain_loss"] > 0
        run_cfg = json.loads((tmp_path / "runs" / r["run_dir"].split("/")[-1] / "config.json").read_text())
        assert run_cfg["eval_data"].endswith("heldout.jsonl") and run_cfg["learning_rate"] == 0.001
        assert run_cfg["answer_field"] == ("original_answer" if m == "sft" else "answer")
        assert run_cfg["teacher_context"] == ("chat" if m == "raft-chat" else None)
    assert "held-out domain loss" in result.output
    # the base model and each method evaluated on the same held-out split, then compared
    comparison = tmp_path / "runs" / summary["comparison"]["dir"].split("/")[-1]
    table = json.loads((comparison / "comparison.json").read_text())
    assert list(table["rows"]) == ["base", "raft", "sft", "raft-chat"]
    assert table["rows"]["base"]["weight dist."] == 0.0 and table["rows"]["sft"]["weight dist."] > 0
    assert all(table["rows"][m]["ROUGE-L"] is not None for m in table["rows"])
    assert "Results (Table 1 shape)" in result.output
    assert (comparison / "training_curves.png").exists()  # CE/KL/lambda of the trained methods


def test_run_rejects_unknown_sections_and_methods(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("refine: {data: demo}\nmethods: [magic]\n")
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 2 and "unknown method" in result.output
    for methods, text in [("[{name: x, method: raft, tau: 3}]", "unknown setting(s) ['tau']"),
                          ("[{method: raft}]", "neither a method name"),
                          ("[raft, {name: raft, method: raft, lr: 0.1}]", "names must be unique")]:
        path.write_text(f"refine: {{data: demo}}\nmethods: {methods}\n")
        result = CliRunner().invoke(app, ["run", "--config", str(path)])
        assert result.exit_code == 2 and text in " ".join(result.output.split()), result.output
    path.write_text("refin: {data: demo}\n")
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 2 and "unknown section" in result.output


def test_run_refuses_bad_settings_of_every_stage_before_refine_starts(tmp_path):
    """A bad train or eval value is found when the config is read, not after refine has run; the error names
    the file, the line and the setting."""
    path = tmp_path / "run.yaml"
    runs = tmp_path / "runs"
    for body, line, key, text in [
        ("train:\n  max_steps: 2\n  batch_size: 0\n", 6, "train.batch_size", "must be >= 1, got 0"),
        ("methods:\n  - sft\n  - {name: x, method: raft, kl_direction: sideways}\n", 6, "methods.1.kl_direction",
         "input should be 'forward' or 'reverse'"),
        ("eval:\n  suites: [domain, nonsense]\n", 5, "eval.suites", "nonsense"),
        ("train:\n  gradient_checkpointin: true\n", 5, "train.gradient_checkpointin", "unknown setting(s)"),
    ]:
        path.write_text(f"refine:\n  data: demo\n  out_dir: {runs}\n{body}")
        result = CliRunner().invoke(app, ["run", "--config", str(path)])
        out = " ".join(result.output.split())
        assert result.exit_code == 2 and f"{path}:{line}: setting {key}:" in "".join(result.output.split("\n")), out
        assert text in out, out
        assert not runs.exists()  # nothing was started


def test_the_gpu_comparison_config_runs_shrunk_on_cpu(tmp_path, tiny_model_dir, monkeypatch):
    """configs/medquad-gpu.yaml unchanged but for --set flags that shrink it: every baseline, post-hoc
    transform and ablation trains (or is made) and is evaluated, and the comparison has a row for each."""
    from conftest import shared_data

    shared_data("medquad", "qa.jsonl.gz")
    shared_data("alpaca_tiny", "alpaca_tiny.json")
    tiny = str(tiny_model_dir)
    shrink = {
        **_tiny_refine(tiny, tmp_path / "runs"),
        "train.max_steps": 1, "train.batch_size": 3, "train.rollout_max_new_tokens": 4, "train.top_k": 8,
        "train.max_len": 96, "train.max_reference_tokens": 32, "train.eval_limit": 2, "train.device": "cpu",
        "eval.judges": f"[{tiny}]", "eval.domain_limit": 2, "eval.ifeval_limit": 2, "eval.mmlu_subjects": "[anatomy]",
        "eval.mmlu_limit_per_subject": 2, "eval.general_limit": 1, "eval.max_new_tokens": 4,
        "eval.judge_max_new_tokens": 4, "eval.judge_retries": 0, "eval.batch_size": 4, "eval.device": "cpu",
    }
    summary, labels = _run_shrunk("medquad-gpu.yaml", shrink, tmp_path / "runs", monkeypatch)
    assert list(summary["methods"]) == labels and len(labels) == 17
    table = json.loads((Path(summary["comparison"]["dir"]) / "comparison.json").read_text())
    assert list(table["rows"]) == ["base", *labels]
    runs = {m: json.loads((Path(r["run_dir"]) / "config.json").read_text()) for m, r in summary["methods"].items()
            if "posthoc" not in r}
    assert runs["sft"]["answer_field"] == "original_answer" and runs["raft"]["answer_field"] == "answer"
    assert runs["sdft"]["data"].startswith(summary["sdft_dir"]) and runs["sdft"]["answer_field"] == "answer"
    assert runs["sft-then-distill"]["model"] == summary["methods"]["sft"]["model"]
    assert runs["sft-then-distill"]["teacher_model"] == tiny
    assert runs["raft"]["resolved"]["teacher_context"] == "chat"
    assert runs["raft-appendix-h"]["resolved"]["teacher_context"] == "appendix_h"
    assert summary["methods"]["fapm"]["posthoc"] == "fapm" and summary["methods"]["wise-0.5"]["from"] == "sft"
    for m in labels:
        assert table["rows"][m]["weight dist."] is not None


def test_several_entries_of_one_method_are_one_trade_off_curve(tmp_path, tiny_model_dir):
    """sft at two learning rates, WiSE-FT of one of them at three alphas and raft at two lambdas: each
    entry trains (or is made) and is evaluated, pipeline.json says its curve and swept setting, and the
    comparison draws one curve per method. WiSE-FT at alpha 1 is the SFT model and at alpha 0 the base, so
    the held-out loss measured here for post-hoc models equals what the training run measured."""
    import pytest

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What does g{i} do?", "answer": f"g{i} adds {i}."}) + "\n"
                            for i in range(12)))
    ifeval = tmp_path / "ifeval.jsonl"
    ifeval.write_text("".join(json.dumps({"key": i, "prompt": p, "instruction_id_list": ["punctuation:no_comma"],
                                          "kwargs": [{}]}) + "\n" for i, p in enumerate(["Name a colour.", "Name a tree."])))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"instruction": f"Question {i}: what helps a headache?"}) + "\n" for i in range(2)))
    tiny = str(tiny_model_dir)
    cfg = {
        "refine": {"data": str(data), "out_dir": str(tmp_path / "runs"), "model": tiny, "judges": [tiny],
                   "max_new_tokens": 6, "judge_max_new_tokens": 4, "rounds": 1, "tau": -1.0, "test_fraction": 0.25,
                   "device": "cpu"},
        "train": {"batch_size": 3, "max_steps": 2, "rollout_max_new_tokens": 4, "top_k": 8, "device": "cpu"},
        "methods": [{"name": "sft-a", "method": "sft", "lr": 1e-3}, {"name": "sft-b", "method": "sft", "lr": 1e-2},
                    *({"name": f"wise-{a:g}", "posthoc": "wise", "from": "sft-a", "alpha": a} for a in (0.0, 0.5, 1.0)),
                    {"name": "raft-ema", "method": "raft", "lr": 1e-3},
                    {"name": "raft-0.5", "method": "raft", "lr": 1e-3, "kl_lambda": 0.5}],
        "eval": {"suites": ["drift", "ifeval"], "ifeval_data": str(ifeval), "general_data": str(general),
                 "max_new_tokens": 4, "device": "cpu"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(next((tmp_path / "runs").glob("refine-*/pipeline.json")).read_text())
    m = summary["methods"]
    assert [(label, r["curve"], r["setting"]) for label, r in m.items()] == [
        ("sft-a", "sft", {"lr": 1e-3}), ("sft-b", "sft", {"lr": 1e-2}),
        ("wise-0", "wise(sft-a)", {"alpha": 0.0}), ("wise-0.5", "wise(sft-a)", {"alpha": 0.5}),
        ("wise-1", "wise(sft-a)", {"alpha": 1.0}),
        ("raft-ema", "raft", {"kl_lambda": None}), ("raft-0.5", "raft", {"kl_lambda": 0.5})]
    assert m["wise-1"]["domain_loss"] == pytest.approx(m["sft-a"]["domain_loss"], rel=1e-4)
    assert m["wise-0"]["domain_loss"] == pytest.approx(m["sft-a"]["base_domain_loss"], rel=1e-4)
    assert m["wise-0.5"]["base_domain_loss"] == m["sft-a"]["base_domain_loss"]
    comparison = Path(summary["comparison"]["dir"])
    t = json.loads((comparison / "comparison.json").read_text())["tradeoff"]
    assert t["curves"] == {"base": ["base"], "sft": ["sft-a", "sft-b"], "wise(sft-a)": ["wise-0", "wise-0.5", "wise-1"],
                           "raft": ["raft-ema", "raft-0.5"]}
    assert t["points"]["sft-b"]["domain_gain"] == pytest.approx(m["sft-b"]["base_domain_loss"] - m["sft-b"]["domain_loss"])
    assert all(p["drift KL"] is not None for p in t["points"].values())
    assert t["points"]["wise-0"]["drift KL"] == pytest.approx(0.0, abs=1e-6)  # alpha 0 is the base model
    assert "base" in t["front"]["drift KL"] and (comparison / "tradeoff_curves.png").exists()
    assert "Trade-off: domain gain vs forgetting" in result.output


def test_the_tradeoff_config_runs_shrunk_on_cpu(tmp_path, tiny_model_dir, monkeypatch):
    """configs/medquad-tradeoff.yaml unchanged but for --set flags that shrink it: SFT at three learning
    rates, WiSE-FT at three alphas, SFT and RAFT at three budgets and RAFT alone are trained (or made),
    evaluated, and drawn as five curves."""
    from conftest import shared_data

    shared_data("medquad", "qa.jsonl.gz")
    shared_data("ifeval", "input_data.jsonl")
    shared_data("alpaca_eval", "alpaca_eval.jsonl")
    tiny = str(tiny_model_dir)
    shrink = {
        **_tiny_refine(tiny, tmp_path / "runs"),
        "train.max_steps": 2, "train.batch_size": 3, "train.rollout_max_new_tokens": 4, "train.top_k": 8,
        "train.max_len": 96, "train.max_reference_tokens": 32, "train.eval_limit": 2, "train.device": "cpu",
        "train.monitor_every": 1, "train.monitor_limit": 3, "train.monitor_max_new_tokens": 4,
        "eval.ifeval_limit": 2, "eval.general_limit": 2, "eval.max_new_tokens": 4, "eval.batch_size": 4,
        "eval.device": "cpu",
    }
    summary, labels = _run_shrunk("medquad-tradeoff.yaml", shrink, tmp_path / "runs", monkeypatch)
    assert list(summary["methods"]) == labels and len(labels) == 13
    for m, r in summary["methods"].items():
        if "budget" in m:
            run_cfg = json.loads((Path(r["run_dir"]) / "config.json").read_text())
            budget = run_cfg["forgetting_budget"]
            assert r["setting"] == {"forgetting_budget": budget} and budget == float(m.rsplit("-", 1)[1])
            assert r["budget_met"] is run_cfg["budget"]["met"]  # whether the trainer kept it, as it said
    t = json.loads((Path(summary["comparison"]["dir"]) / "comparison.json").read_text())["tradeoff"]
    assert {c: len(runs) for c, runs in t["curves"].items()} == {
        "base": 1, "sft": 3, "wise(sft-lr1e-5)": 3, "sft budget": 3, "raft": 1, "raft budget": 3}
    assert t["points"]["sft-lr3e-5"]["setting"] == {"lr": 3e-5} and t["points"]["wise-0.5"]["setting"] == {"alpha": 0.5}
    assert all(p["domain_gain"] is not None and p["drift KL"] is not None for p in t["points"].values())
    assert t["front"]["drift KL"] and (Path(summary["comparison"]["dir"]) / "tradeoff_curves.png").exists()


def _tiny_refine(tiny: str, runs: Path) -> dict:
    """--set values that shrink a config's refine section to the tiny model: one round, every rewrite kept."""
    return {"refine.model": tiny, "refine.judges": f"[{tiny}]", "refine.limit": 6, "refine.batch_size": 3,
            "refine.max_new_tokens": 4, "refine.judge_max_new_tokens": 4, "refine.rounds": 1, "refine.tau": -1.0,
            "refine.device": "cpu", "refine.out_dir": str(runs)}


def _run_shrunk(config_name: str, shrink: dict, runs: Path, monkeypatch) -> tuple[dict, list[str]]:
    """`raftune run` on configs/<config_name> unchanged but for ``shrink`` as --set flags; (pipeline.json, the
    config's entry labels in order)."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the config's data paths are relative to the checkout, as in the README
    config = yaml.safe_load((repo / "configs" / config_name).read_text())
    args = ["run", "--config", f"configs/{config_name}"] + [a for k, v in shrink.items() for a in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(next(runs.glob("refine-*/pipeline.json")).read_text())
    return summary, [m if isinstance(m, str) else m["name"] for m in config["methods"]]
