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


def test_each_run_has_one_colour_in_every_plot(tmp_path, monkeypatch):
    """A run is drawn in the same colour in the retention bars, the trade-off and each training-curve panel,
    even where a panel lacks some runs (SFT has no KL or lambda curve)."""
    from raftune import compare as compare_module

    def write_trained(name, r, rows):
        model = tmp_path / f"train-{name}" / "model"
        model.mkdir(parents=True)
        (model.parent / "metrics.jsonl").write_text("".join(json.dumps({"lr": 1e-4, "step": i + 1, **row}) + "\n"
                                                            for i, row in enumerate(rows)))
        folder = write(tmp_path, name, r)
        (folder / "results.json").write_text(json.dumps({"suites": r, "config": {"model": str(model)}}))
        return folder

    folders = [write(tmp_path, "base", results(0.1, 0.4, 0.25, 6)),
               write_trained("sft", results(0.12, 0.3, 0.25, 5), [{"ce": 2.0}, {"ce": 1.9}]),
               write_trained("raft", results(0.15, 0.39, 0.26, 5.8), [{"ce": 2.1, "kl": 0.5, "lambda": 4.0}] * 2)]
    drawn = {}
    real_save = compare_module._save

    def spy(fig, path):
        from matplotlib.colors import to_hex

        for ax in fig.axes:
            title = ax.get_title() or path.name
            legend = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
            if ax.containers:  # bars: one container per run (and a grey line at 100%)
                drawn[title] = {c.get_label(): to_hex(c.patches[0].get_facecolor()) for c in ax.containers}
            elif ax.collections:  # the scatter: one collection per run, in table order
                drawn[title] = {lbl: to_hex(c.get_facecolor()[0]) for lbl, c in zip(["base", "sft", "raft"], ax.collections)}
            else:  # curves: one line per run
                drawn[title] = {lbl: to_hex(line.get_color()) for lbl, line in zip(legend, ax.lines)}
        return real_save(fig, path)

    monkeypatch.setattr(compare_module, "_save", spy)
    compare(folders, None, tmp_path / "cmp")
    assert set(drawn) == {"retention.png", "Domain gain vs general ability", "ce", "kl", "lambda"}, drawn
    assert set(drawn["ce"]) == {"sft", "raft"} and set(drawn["kl"]) == {"raft"}
    colours = {}
    for panel in drawn.values():
        for label, c in panel.items():
            assert colours.setdefault(label, c) == c, (label, drawn)
    assert len(set(colours.values())) == 3
