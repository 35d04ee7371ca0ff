import json

import pytest

from raftune.compare import build_table, compare, to_markdown


def results(d_acc, ifeval, mmlu, general, kl=None):
    r = {"domain": {"d_acc": d_acc, "rouge_l": 0.3}, "ifeval": {"prompt_strict": ifeval, "prompt_loose": ifeval + 0.02},
         "mmlu": {"accuracy": mmlu}, "general": {"mean_score": general}}
    if kl is not None:
        r["drift"] = {"kl_base_to_tuned": kl}
    return r


def write(tmp_path, name, r):
    folder = tmp_path / f"eval-{name}"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"suites": r, "config": {}}))  # raftune eval's layout
    return folder


def test_table_retention_and_deltas(tmp_path):
    runs = {"base": results(0.10, 0.40, 0.25, 6.0), "sft": results(0.128, 0.30, 0.24, 4.5, kl=0.4),
            "raft": results(0.172, 0.38, 0.25, 5.7, kl=0.1)}
    t = build_table(runs)
    assert t["columns"][:5] == ["D-Acc", "IFEval strict", "IFEval loose", "MMLU", "General"]
    assert t["retention"]["sft"]["IFEval strict"] == pytest.approx(0.75)
    assert t["retention"]["raft"]["General"] == pytest.approx(0.95)
    assert t["retention"]["base"]["MMLU"] == pytest.approx(1.0)
    md = to_markdown(t)
    assert "| raft | 17.2 (+4.4 vs SFT)" in md  # D-Acc 17.2 vs 12.8, the paper's SmolLM3 figures
    assert "| sft | 75.0% |" in md.split("Retention")[1]
    assert "drift KL" in t["columns"] and t["rows"]["base"]["drift KL"] is None


def test_compare_writes_files_and_plots(tmp_path):
    folders = [write(tmp_path, n, r) for n, r in [("base", results(0.1, 0.4, 0.25, 6)), ("sft", results(0.12, 0.3, 0.25, 5)),
                                                  ("raft", results(0.15, 0.39, 0.26, 5.8))]]
    out = compare(folders, None, tmp_path / "cmp")
    assert (tmp_path / "cmp" / "comparison.md").read_text() == out["markdown"]
    assert {p.split("/")[-1] for p in out["plots"]} == {"retention.png", "tradeoff.png"}
    with pytest.raises(ValueError, match="labels"):
        compare(folders, ["a"], tmp_path / "cmp")
    with pytest.raises(FileNotFoundError, match="results.json"):
        compare([tmp_path], None, tmp_path / "cmp")


def test_compare_command(tmp_path):
    from typer.testing import CliRunner

    from raftune.cli import app

    folders = [str(write(tmp_path, n, results(0.1 + i / 100, 0.4, 0.25, 6 - i))) for i, n in enumerate(["base", "sft", "raft"])]
    result = CliRunner().invoke(app, ["compare", *folders, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "| raft | 12.0 (+1.0 vs SFT)" in result.output and "Retention vs base" in result.output
    bad = CliRunner().invoke(app, ["compare", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "no results.json" in bad.output


def test_without_general_metrics_there_is_no_retention(tmp_path):
    only_domain = {"domain": {"d_acc": 0.5, "rouge_l": 0.2}, "weights": {"mean": 0.0}}
    folders = [write(tmp_path, n, only_domain) for n in ("base", "raft")]
    out = compare(folders, None, tmp_path / "cmp")
    assert "Retention" not in out["markdown"] and out["plots"] == []
