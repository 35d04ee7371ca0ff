import json
import re

import pytest

from raftune.compare import CompareError, build_table, compare, to_markdown


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
    with pytest.raises(CompareError, match="labels"):
        compare(folders, ["a"], tmp_path / "cmp")
    with pytest.raises(CompareError, match="no results.json"):
        compare([tmp_path], None, tmp_path / "cmp")


def test_compare_command(tmp_path):
    from typer.testing import CliRunner

    from raftune.cli import app

    folders = [str(write(tmp_path, n, results(0.1 + i / 100, 0.4, 0.25, 6 - i))) for i, n in enumerate(["base", "sft", "raft"])]
    result = CliRunner().invoke(app, ["compare", *folders, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "| raft | 12.0 (+1.0 vs SFT)" in result.output and "Retention vs base" in result.output
    bad = CliRunner().invoke(app, ["compare", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "nothing: not found" in bad.output


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



# --- inputs compare refuses, and the one it tables with a warning ----------------------------------------------

GOOD = {"suites": results(0.1, 0.4, 0.25, 6), "config": {"suites": ["domain", "ifeval", "mmlu", "general"]}}


def with_suites(**suites):
    return json.dumps({"suites": {**GOOD["suites"], **suites}, "config": {}})


BAD_FILES = {  # test id: (results.json content, what the error says after the file name)
    "not-utf8": (b"\xff\xfe{\x00}\x00", "not UTF-8 text (byte 0"),
    "empty": ("", "empty file"),
    "truncated": ('{"suites": {"domain": {"d_acc": 0.5}', "invalid JSON at line 1, column 37: Expecting ',' delimiter"),
    "bad-syntax-line-2": ('{\n  "suites": {,\n}', "invalid JSON at line 2, column 14: Expecting property name"),
    "deep-nesting": ("[" * 100_000, "nested too deeply"),
    "a-list": ("[1, 2]", "expected a JSON object (an eval results.json), got a list"),
    "a-string": ('"results"', 'expected a JSON object (an eval results.json), got "results"'),
    # raftune compare's own output: a JSON object, but no eval result
    "comparison-json": (json.dumps({"columns": [], "rows": {}, "retention": {}}),
                        "not a raftune evaluation result: no 'suites' or 'config' key"),
    "no-config": (json.dumps({"suites": GOOD["suites"]}), "not a raftune evaluation result: no 'config' key"),
    "suites-a-list": (json.dumps({"suites": [], "config": {}}), "suites: expected an object, got a list"),
    "config-a-string": (json.dumps({"suites": GOOD["suites"], "config": "eval.yaml"}),
                        'config: expected an object, got "eval.yaml"'),
    "complete-a-string": (json.dumps({**GOOD, "complete": "no"}), 'complete: expected true or false, got "no"'),
    "no-suites": (json.dumps({"suites": {}, "config": {}}),
                  "suites: none of the suites compare tables (domain, ifeval, mmlu, general, drift, weights, lm-eval)"),
    "unknown-suite-only": (json.dumps({"suites": {"humaneval": {"pass@1": 0.3}}, "config": {}}), "found: humaneval"),
    "suite-a-number": (with_suites(domain=0.5), "suites.domain: expected an object, got 0.5"),
    "metric-a-string": (with_suites(domain={"d_acc": "high"}), 'suites.domain.d_acc: expected a number, got "high"'),
    "metric-a-bool": (with_suites(mmlu={"accuracy": True}), "suites.mmlu.accuracy: expected a number, got true"),
    "metric-a-list": (with_suites(general={"mean_score": [7, 8]}),
                      "suites.general.mean_score: expected a number, got a list"),
    "metric-an-object": (with_suites(drift={"kl_base_to_tuned": {"mean": 0.1}}),
                         "suites.drift.kl_base_to_tuned: expected a number, got an object"),
    "long-value-cut": (with_suites(domain={"d_acc": "x" * 60}), 'got "' + "x" * 36 + "..."),
    "config-suites-a-string": (json.dumps({**GOOD, "config": {"suites": "domain,mmlu"}}),
                               'config.suites: expected a list of suite names, got "domain,mmlu"'),
    "config-model-a-number": (json.dumps({**GOOD, "config": {"model": 3}}), "config.model: expected a string, got 3"),
}


@pytest.mark.parametrize("content, fragment", BAD_FILES.values(), ids=BAD_FILES)
def test_a_bad_results_file_is_refused_naming_it(tmp_path, content, fragment):
    base = write(tmp_path, "base", GOOD["suites"])
    bad = tmp_path / "eval-sft" / "results.json"
    bad.parent.mkdir()
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CompareError) as e:
        compare([base, bad.parent], None, tmp_path / "cmp")
    assert str(e.value).startswith(f"{bad}: ") and fragment in str(e.value), str(e.value)
    assert not (tmp_path / "cmp").exists()  # checked before anything is built or written


def _missing(tmp_path, monkeypatch):
    return tmp_path / "eval-gone", "not found (expected an eval run folder or its results.json)"


def _empty_folder(tmp_path, monkeypatch):
    (tmp_path / "eval-empty").mkdir()
    return tmp_path / "eval-empty", "no results.json in this folder"


def _results_json_is_a_folder(tmp_path, monkeypatch):
    (tmp_path / "eval-odd" / "results.json").mkdir(parents=True)
    return tmp_path / "eval-odd", "no results.json in this folder"


def _unreadable(tmp_path, monkeypatch):
    path = write(tmp_path, "locked", GOOD["suites"]) / "results.json"
    read_bytes = type(path).read_bytes

    def refuse(self):  # chmod 000 is no obstacle when the tests run as root
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    return path, "results.json: cannot be read (Permission denied)"


@pytest.mark.parametrize("setup", [_missing, _empty_folder, _results_json_is_a_folder, _unreadable])
def test_a_missing_or_unreadable_input_is_refused_naming_it(tmp_path, monkeypatch, setup):
    base = write(tmp_path, "base", GOOD["suites"])
    arg, fragment = setup(tmp_path, monkeypatch)
    with pytest.raises(CompareError) as e:
        compare([base, arg], None, tmp_path / "cmp")
    assert str(e.value).startswith(str(arg)) and fragment in str(e.value), str(e.value)


@pytest.mark.parametrize("args, labels, fragment", [
    ([], None, "no runs to compare"),
    (["eval-base", "eval-sft"], ["base"], "1 labels for 2 runs: pass one --label per run"),
    (["eval-base", "eval-sft"], ["x", "x"], "labels must differ: 'x' names both {tmp}/eval-base and {tmp}/eval-sft"),
    (["eval-base", "other/eval-base"], None,
     "labels must differ: 'base' names both {tmp}/eval-base and {tmp}/other/eval-base"),
    (["eval-base", "eval-base/results.json"], None,  # the same run twice
     "labels must differ: 'base' names both {tmp}/eval-base and {tmp}/eval-base/results.json"),
    (["eval-base", "eval-sft"], ["base", " "], "{tmp}/eval-sft: empty label"),
])
def test_labels_and_run_counts_are_checked(tmp_path, args, labels, fragment):
    for name in ("eval-base", "eval-sft", "other/eval-base"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(json.dumps(GOOD))
    with pytest.raises(CompareError, match="^" + re.escape(fragment.format(tmp=tmp_path))):
        compare([tmp_path / a for a in args], labels, tmp_path / "cmp")


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(CompareError, match="taken: not a folder, so --out"):
        compare([write(tmp_path, "base", GOOD["suites"])], None, tmp_path / "taken" / "cmp")


def test_a_results_json_path_is_labelled_by_its_run_folder(tmp_path):
    folders = [write(tmp_path, n, results(0.1 + i / 100, 0.4, 0.25, 6)) for i, n in enumerate(["base", "sft"])]
    out = compare([f / "results.json" for f in folders], None, tmp_path / "cmp")
    assert list(out["rows"]) == ["base", "sft"] and "| sft | 11.0 |" in out["markdown"]


def test_an_eval_results_json_gives_the_table_of_its_suites(tmp_path):
    """Every key raftune eval writes passes the checks, and the table is the one of the bare suites."""
    suites = {"base": results(0.1, 0.4, 0.25, 6), "sft": results(0.128, 0.3, 0.24, 4.5, kl=0.4),
              "raft": results(0.172, 0.38, 0.25, 5.7, kl=0.1)}
    folders = []
    for name, r in suites.items():
        folder = write(tmp_path, name, r)
        (folder / "results.json").write_text(json.dumps({
            "suites": r, "config": {"model": "default", "suites": list(r)}, "settings": {}, "run_dir": str(folder),
            "complete": True, "retention": {"ifeval.prompt_strict": {"score": 0.3, "base": 0.4, "retention": 0.75}}}))
        folders.append(folder)
    out = compare(folders, None, tmp_path / "cmp")
    assert out["markdown"] == to_markdown(build_table(suites)) and "(incomplete)" not in out["markdown"]
    assert out["incomplete"] == {}


def test_an_incomplete_evaluation_is_tabled_with_a_warning_and_a_marker(tmp_path, caplog):
    r = results(0.128, 0.3, 0.24, 4.5)
    folders = [write(tmp_path, "base", results(0.1, 0.4, 0.25, 6)), write(tmp_path, "sft", r),
               write(tmp_path, "raft", results(0.172, 0.38, 0.25, 5.7))]
    stopped = folders[1] / "results.json"  # stopped after two of its four suites
    stopped.write_text(json.dumps({"suites": {k: r[k] for k in ("domain", "ifeval")}, "complete": False,
                                   "config": {"suites": ["domain", "ifeval", "mmlu", "general"]}}))
    with caplog.at_level("WARNING", logger="raftune.compare"):
        out = compare(folders, None, tmp_path / "cmp")
    [warning] = [rec.getMessage() for rec in caplog.records if "incomplete evaluation" in rec.getMessage()]
    assert warning.startswith(f"{stopped}: incomplete evaluation") and "missing suite(s) mmlu, general" in warning
    assert out["incomplete"] == {"sft": ["mmlu", "general"]}
    md = out["markdown"]
    assert "| sft (incomplete) | 12.8 |" in md and "| raft | 17.2 (+4.4 vs SFT)" in md  # still the SFT reference
    assert "(incomplete) `sft`: its evaluation had not finished" in md and "missing suite(s): mmlu, general" in md
    assert "| sft (incomplete) | 75.0% |" in md.split("Retention")[1]
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["incomplete"] == {"sft": ["mmlu", "general"]}


def test_an_unreadable_training_log_costs_its_curves_not_the_table(tmp_path, caplog):
    model = tmp_path / "train-raft" / "model"
    model.mkdir(parents=True)
    (model.parent / "metrics.jsonl").write_text('{"lr": 1e-4, "step": 1, "ce": 2.0}\nnot json\n')
    folder = write(tmp_path, "raft", results(0.15, 0.39, 0.26, 5.8))
    (folder / "results.json").write_text(json.dumps({"suites": results(0.15, 0.39, 0.26, 5.8),
                                                     "config": {"model": str(model)}}))
    with caplog.at_level("WARNING", logger="raftune.compare"):
        out = compare([folder], None, tmp_path / "cmp")
    assert "| raft | 15.0 |" in out["markdown"] and not any(p.endswith("training_curves.png") for p in out["plots"])
    assert any(f"{model.parent / 'metrics.jsonl'}: no training curves" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "invalid JSON at line 1, column 2"),
    (with_suites(domain={"d_acc": "high"}), 'suites.domain.d_acc: expected a number, got "high"'),
    (with_suites(domain={"d_acc": float("nan")}), "suites.domain.d_acc: expected a rate in [0, 1], got NaN"),
    (json.dumps([GOOD]), "expected a JSON object"),
    (None, "eval-sft: no results.json in this folder"),
])
def test_compare_command_names_a_bad_file_in_one_line(tmp_path, content, fragment):
    from typer.testing import CliRunner

    from raftune.cli import app

    base = write(tmp_path, "base", GOOD["suites"])
    bad = tmp_path / "eval-sft"
    bad.mkdir()
    if content is not None:
        (bad / "results.json").write_text(content)
    result = CliRunner().invoke(app, ["compare", str(base), str(bad), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {bad}") and fragment in result.output
    assert "Traceback" not in result.output and not (tmp_path / "cmp").exists()


def test_compare_command_marks_an_incomplete_evaluation(tmp_path):
    from typer.testing import CliRunner

    from raftune.cli import app

    folders = [write(tmp_path, n, results(0.1, 0.4, 0.25, 6)) for n in ("base", "sft")]
    (folders[1] / "results.json").write_text(json.dumps({**GOOD, "complete": False}))
    result = CliRunner().invoke(app, ["compare", *map(str, folders), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "incomplete evaluation" in " ".join(result.output.split())  # the log handler wraps its lines
    assert "| sft (incomplete) |" in result.output


# --- impossible values: no evaluation produces them, so the file is refused ----------------------------------

IMPOSSIBLE = {  # test id: (suites changed, what the error says after the file name)
    "d_acc-above-1": ({"domain": {"d_acc": 1.5}}, "suites.domain.d_acc: expected a rate in [0, 1], got 1.5"),
    "d_acc-negative": ({"domain": {"d_acc": -0.1}}, "suites.domain.d_acc: expected a rate in [0, 1], got -0.1"),
    "d_acc-nan": ({"domain": {"d_acc": float("nan")}}, "suites.domain.d_acc: expected a rate in [0, 1], got NaN"),
    "mmlu-infinity": ({"mmlu": {"accuracy": float("inf")}}, "suites.mmlu.accuracy: expected a rate in [0, 1], got Infinity"),
    "ifeval-loose-above-1": ({"ifeval": {"prompt_strict": 0.4, "prompt_loose": 1.2}},
                             "suites.ifeval.prompt_loose: expected a rate in [0, 1], got 1.2"),
    "score-below-scale": ({"general": {"mean_score": 0.5}}, "suites.general.mean_score: expected a score in [1, 10], got 0.5"),
    "score-above-scale": ({"general": {"mean_score": 11}}, "suites.general.mean_score: expected a score in [1, 10], got 11"),
    "win-rate-above-1": ({"general": {"win_rate": 2.0}}, "suites.general.win_rate: expected a rate in [0, 1], got 2.0"),
    "cosine-below-minus-1": ({"domain": {"d_acc": 0.1, "cosine": -1.5}},
                             "suites.domain.cosine: expected a cosine in [-1, 1], got -1.5"),
    "kl-negative": ({"drift": {"kl_base_to_tuned": -0.2}}, "suites.drift.kl_base_to_tuned: expected a divergence >= 0, got -0.2"),
    "perplexity-below-1": ({"drift": {"kl_base_to_tuned": 0.1, "tuned_perplexity": 0.5}},
                           "suites.drift.tuned_perplexity: expected a perplexity >= 1, got 0.5"),
    "weight-distance-negative": ({"weights": {"mean": -0.01}}, "suites.weights.mean: expected a distance >= 0, got -0.01"),
    "count-negative": ({"domain": {"d_acc": 0.1, "n": -3}}, "suites.domain.n: expected a count (an integer >= 0), got -3"),
    "count-fractional": ({"ifeval": {"prompt_strict": 0.4, "n_prompts": 2.5}},
                         "suites.ifeval.n_prompts: expected a count (an integer >= 0), got 2.5"),
    "count-a-bool": ({"general": {"mean_score": 6, "n_scored": True}},
                     "suites.general.n_scored: expected a count (an integer >= 0), got true"),
    "subject-count-negative": ({"mmlu": {"accuracy": 0.3, "per_subject": {"anatomy": {"accuracy": 0.3, "n": -1}}}},
                               "suites.mmlu.per_subject.anatomy.n: expected a count (an integer >= 0), got -1"),
    "subject-accuracy-above-1": ({"mmlu": {"accuracy": 0.3, "per_subject": {"anatomy": {"accuracy": 3, "n": 4}}}},
                                 "suites.mmlu.per_subject.anatomy.accuracy: expected a rate in [0, 1], got 3"),
    "per-subject-a-list": ({"mmlu": {"accuracy": 0.3, "per_subject": ["anatomy"]}},
                           "suites.mmlu.per_subject: expected an object, got a list"),
    "data-hashes-a-list": ({}, "inputs.data: expected an object, got a list"),
}


@pytest.mark.parametrize("suites, fragment", IMPOSSIBLE.values(), ids=IMPOSSIBLE)
def test_a_value_no_evaluation_can_produce_is_refused(tmp_path, suites, fragment):
    base = write(tmp_path, "base", GOOD["suites"])
    bad = tmp_path / "eval-sft" / "results.json"
    bad.parent.mkdir()
    content = {"suites": {**GOOD["suites"], **suites}, "config": {}}
    if not suites:
        content["inputs"] = {"data": ["file:abc"]}
    bad.write_text(json.dumps(content))  # json writes NaN and Infinity as raftune's own writer would have
    with pytest.raises(CompareError) as e:
        compare([base, bad.parent], None, tmp_path / "cmp")
    assert str(e.value).startswith(f"{bad}: ") and fragment in str(e.value), str(e.value)
    assert not (tmp_path / "cmp").exists()


def test_values_at_the_edges_of_their_ranges_are_tabled(tmp_path):
    edges = {"domain": {"d_acc": 1.0, "rouge_l": 0.0, "cosine": 1.0000001, "n": 0}, "general": {"mean_score": 10},
             "mmlu": {"accuracy": 0, "per_subject": {"anatomy": {"accuracy": 0.0, "n": 3}}},
             "drift": {"kl_base_to_tuned": 0.0, "tuned_perplexity": 1.0}, "weights": {"mean": 0.0}}
    out = compare([write(tmp_path, "raft", edges)], None, tmp_path / "cmp")
    assert out["rows"]["raft"]["D-Acc"] == 1.0 and out["rows"]["raft"]["General"] == 10
    assert out["rows"]["raft"]["cosine"] == 1.0000001  # fp32 rounding of two equal embeddings, not an impossible value


# --- comparability: deltas only between runs that scored the same samples the same way -------------------------

HASH = {"domain_data": "file:" + "a" * 32, "ifeval_data": "file:" + "b" * 32, "mmlu_folder": "folder:" + "c" * 32,
        "general_data": "file:" + "d" * 32}


def counted(d_acc, ifeval, mmlu, general, n=100):
    """Summaries as raftune eval writes them: with the counts of the samples scored."""
    return {"domain": {"d_acc": d_acc, "rouge_l": 0.3, "n": n, "n_judged": n, "n_unjudged": 0},
            "ifeval": {"prompt_strict": ifeval, "prompt_loose": ifeval + 0.02, "n_prompts": 50},
            "mmlu": {"accuracy": mmlu, "n": 20, "form": "cloze", "shots": 0,
                     "per_subject": {"anatomy": {"accuracy": mmlu, "n": 10}, "virology": {"accuracy": mmlu, "n": 10}}},
            "general": {"mean_score": general, "mode": "score", "aggregate": "mean", "n": 80, "n_scored": 80}}


def write_run(tmp_path, name, suites, data=HASH):
    folder = tmp_path / f"eval-{name}"
    folder.mkdir()
    content = {"suites": suites, "config": {}, "complete": True}
    if data is not None:
        content["inputs"] = {"model": f"folder:{name}", "data": data}
    (folder / "results.json").write_text(json.dumps(content))
    return folder


def three_runs(tmp_path, raft=None, raft_data=HASH, sft_data=HASH):
    return [write_run(tmp_path, "base", counted(0.10, 0.40, 0.25, 6.0)),
            write_run(tmp_path, "sft", counted(0.128, 0.30, 0.24, 4.5), data=sft_data),
            write_run(tmp_path, "raft", raft or counted(0.172, 0.38, 0.25, 5.7), data=raft_data)]


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_runs_on_the_same_data_are_compared_without_a_word(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="raftune.compare"):
        out = compare(three_runs(tmp_path), None, tmp_path / "cmp")
    assert _warnings(caplog) == []
    assert "| raft | 17.2 (+4.4 vs SFT)" in out["markdown"] and "n/c" not in out["markdown"]
    assert out["comparability"]["sft"]["raft"]["domain"] == {"comparable": True, "why": []}


def test_a_run_on_other_data_gets_no_delta_but_a_warning_and_a_marker(tmp_path, caplog):
    other = {**HASH, "domain_data": "file:" + "e" * 32}  # raft evaluated on another held-out file
    with caplog.at_level("WARNING", logger="raftune.compare"):
        out = compare(three_runs(tmp_path, raft_data=other), None, tmp_path / "cmp")
    [warning] = _warnings(caplog)
    assert "raft vs sft: suite domain not comparable" in warning and "domain_data differs" in warning
    md = out["markdown"]
    assert "| raft | 17.2 (n/c vs SFT) | 38.0 (+8.0 vs SFT)" in md  # only the domain suite's columns lose their delta
    assert "+4.4" not in md and "n/c: `raft` vs `sft`, suite domain: domain_data differs" in md
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["comparability"]["sft"]["raft"]["domain"]["comparable"] is False
    assert saved["comparability"]["sft"]["raft"]["ifeval"]["comparable"] is True
    assert saved["rows"]["raft"]["D-Acc"] == 0.172  # its own value is still tabled


SAMPLES = {  # test id: (suite, summary keys changed in the raft run, what the reason says)
    "domain-fewer-samples": ("domain", {"n": 50, "n_judged": 50}, "n 50 vs 100"),
    "domain-fewer-judged": ("domain", {"n_judged": 95, "n_unjudged": 5}, "n_judged 95 vs 100"),
    "ifeval-limit": ("ifeval", {"n_prompts": 10}, "n_prompts 10 vs 50"),
    "mmlu-shots": ("mmlu", {"shots": 5}, "shots 5 vs 0"),
    "mmlu-form": ("mmlu", {"form": "letter"}, 'form "letter" vs "cloze"'),
    "mmlu-subjects": ("mmlu", {"per_subject": {"anatomy": {"accuracy": 0.25, "n": 10}, "law": {"accuracy": 0.25, "n": 10}}},
                      "subjects differ (only here: law; only in sft: virology)"),
    "mmlu-limit-per-subject": ("mmlu", {"n": 15, "per_subject": {"anatomy": {"accuracy": 0.25, "n": 10},
                                                                 "virology": {"accuracy": 0.25, "n": 5}}},
                               "virology 5 vs 10"),
    "general-aggregate": ("general", {"aggregate": "majority"}, 'aggregate "majority" vs "mean"'),
    "general-scored": ("general", {"n_scored": 70}, "n_scored 70 vs 80"),
}


@pytest.mark.parametrize("suite, changed, reason", SAMPLES.values(), ids=SAMPLES)
def test_other_samples_or_scoring_is_not_comparable(tmp_path, caplog, suite, changed, reason):
    raft = counted(0.172, 0.38, 0.25, 5.7)
    raft[suite] = {**raft[suite], **changed}
    with caplog.at_level("WARNING", logger="raftune.compare"):
        out = compare(three_runs(tmp_path, raft=raft), None, tmp_path / "cmp")
    verdict = out["comparability"]["sft"]["raft"][suite]
    assert verdict["comparable"] is False and any(reason in why for why in verdict["why"]), verdict
    assert any(f"raft vs sft: suite {suite} not comparable" in w and reason in w for w in _warnings(caplog))
    assert f"n/c: `raft` vs `sft`, suite {suite}: " in out["markdown"]


def test_retention_against_a_base_on_other_samples_is_not_a_number(tmp_path, caplog):
    folders = three_runs(tmp_path)
    base = counted(0.10, 0.40, 0.25, 6.0)
    base["ifeval"]["n_prompts"] = 541  # the base evaluated on the whole IFEval set, the others on 50 prompts
    (folders[0] / "results.json").write_text(json.dumps({"suites": base, "config": {}, "inputs": {"data": HASH}}))
    with caplog.at_level("WARNING", logger="raftune.compare"):
        out = compare(folders, None, tmp_path / "cmp")
    assert out["retention"]["raft"]["IFEval strict"] is None and out["retention"]["raft"]["MMLU"] == pytest.approx(1.0)
    assert any("raft vs base: suite ifeval not comparable" in w for w in _warnings(caplog))
    retention = out["markdown"].split("Retention")[1]
    assert "| raft | n/c | n/c | 100.0% | 95.0% |" in retention
    assert "n/c: `raft` vs `base`, suite ifeval: n_prompts 50 vs 541" in retention
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["retention"]["raft"]["IFEval strict"] is None


def test_results_without_data_hashes_are_compared_but_said_unchecked(tmp_path, caplog):
    """A results.json of an older raftune eval holds no content hash of its data: the deltas are tabled,
    and the output says that whether the runs saw the same data could not be checked."""
    with caplog.at_level("WARNING", logger="raftune.compare"):
        out = compare(three_runs(tmp_path, sft_data=None), None, tmp_path / "cmp")
    assert "| raft | 17.2 (+4.4 vs SFT)" in out["markdown"]
    assert out["comparability"]["sft"]["raft"]["domain"]["comparable"] is None
    [warning] = _warnings(caplog)
    assert warning.startswith("could not check the data of base vs sft (domain, ifeval, mmlu, general), "
                              "raft vs sft (domain, ifeval, mmlu, general), sft vs base (ifeval, mmlu, general)"), warning
    assert "not checked: `raft` vs `sft`, suite(s) domain, ifeval, mmlu, general" in out["markdown"]
    assert out["comparability"]["base"]["raft"]["ifeval"]["comparable"] is True  # base and raft both hold hashes


def test_different_counts_are_caught_even_without_data_hashes(tmp_path):
    raft = counted(0.172, 0.38, 0.25, 5.7, n=60)
    out = compare(three_runs(tmp_path, raft=raft, raft_data=None), None, tmp_path / "cmp")
    assert out["comparability"]["sft"]["raft"]["domain"]["comparable"] is False and "(n/c vs SFT)" in out["markdown"]


# --- comparison.json is strict JSON ------------------------------------------------------------------------------

def _strict(text):
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_comparison_json_is_strict_json_with_missing_and_overflowing_values(tmp_path):
    base = {"general": {"win_rate": 5e-324, "mode": "pairwise"}, "domain": {"d_acc": None}}  # a rate, if a tiny one
    raft = {"general": {"win_rate": 0.5, "mode": "pairwise"}, "domain": {"d_acc": 0.2}}
    folders = [write(tmp_path, "base", base), write(tmp_path, "raft", raft)]
    out = compare(folders, None, tmp_path / "cmp")
    saved = _strict((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["retention"]["raft"]["General win rate"] is None  # 0.5 / 5e-324 overflows: no ratio, not Infinity
    assert saved["rows"]["base"]["D-Acc"] is None and out["rows"]["raft"]["D-Acc"] == 0.2


def test_a_table_built_from_nan_values_holds_none():
    """build_table is library API (``raftune run`` hands it what it read): a NaN is a missing value there."""
    t = build_table({"base": results(0.1, 0.4, 0.25, 6.0), "sft": results(float("nan"), 0.3, float("inf"), 5.0)})
    assert t["rows"]["sft"]["D-Acc"] is None and t["rows"]["sft"]["MMLU"] is None
    _strict(json.dumps(t))


def test_evaluations_by_raftune_eval_on_other_data_are_told_apart(tiny_model_dir, tmp_path):
    """compare reads what raftune eval writes: three real evaluations of the tiny model, the third on an
    IFEval file with one prompt changed; the first two are comparable, the third is not."""
    from raftune.evaluate import EvalConfig, evaluate

    def prompts(path, last):
        path.write_text("".join(json.dumps({"key": i, "prompt": p, "instruction_id_list": ["punctuation:no_comma"],
                                            "kwargs": [{}]}) + "\n"
                                for i, p in enumerate(["Name a colour.", "Name a fruit.", last])))
        return path

    same, other = prompts(tmp_path / "a.jsonl", "Name a tree."), prompts(tmp_path / "b.jsonl", "Name a river.")
    tiny = str(tiny_model_dir)
    folders = [evaluate(EvalConfig(model=tiny, base_model=tiny, judges=(tiny,), encoder=tiny, suites=("ifeval",),
                                   ifeval_data=str(data), out_dir=str(tmp_path / "runs"), name=name, max_new_tokens=4,
                                   device="cpu"), progress=False)
               for name, data in [("base", same), ("sft", same), ("raft", other)]]
    out = compare(folders, None, tmp_path / "cmp")
    assert out["comparability"]["sft"]["base"]["ifeval"] == {"comparable": True, "why": []}
    verdict = out["comparability"]["sft"]["raft"]["ifeval"]
    assert verdict["comparable"] is False and verdict["why"][0].startswith("ifeval_data differs (content file:")
    assert "(n/c vs SFT)" in out["markdown"].split("| raft |")[1].splitlines()[0]
    assert "(n/c" not in out["markdown"].split("| base |")[1].splitlines()[0]
    assert out["comparability"]["base"]["raft"]["ifeval"]["comparable"] is False  # no retention vs base either
    assert out["comparability"]["base"]["sft"]["ifeval"]["comparable"] is True


# --- the trade-off: domain gain against forgetting, one curve per method ----------------------------------------

from raftune.compare import format_setting, group_curves, pareto_front  # noqa: E402


def test_pareto_front_keeps_what_nothing_dominates():
    pts = {"base": (0.0, 0.0), "a": (0.01, 0.1), "a-twin": (0.01, 0.1),  # equal points: neither dominates the other
           "b": (0.02, 0.1),  # as much gain as a for more drift: dominated
           "c": (0.01, 0.05),  # as much drift as a for less gain: dominated
           "d": (0.05, 0.3), "e": (0.04, -0.1),  # e: less gain than the base for more drift
           "f": (0.0, 0.0)}  # equal to the base
    assert pareto_front(pts) == ["base", "a", "a-twin", "d", "f"]
    assert pareto_front({"only": (1.0, 1.0)}) == ["only"]
    assert pareto_front({"x": (0.1, 0.2), "y": (0.2, 0.1)}) == ["x"]


def test_runs_of_one_family_are_one_curve_with_the_setting_that_varies():
    members = {
        "sft-a": {"family": ["sft"], "name": "sft", "settings": {"lr": 3e-6, "kl_lambda": None}},
        "sft-b": {"family": ["sft"], "name": "sft", "settings": {"lr": 1e-5, "kl_lambda": None}},
        "raft": {"family": ["raft"], "name": "raft", "settings": {"lr": 1e-5, "kl_lambda": None}},
        "raft-0.1": {"family": ["raft"], "name": "raft", "settings": {"lr": 1e-5, "kl_lambda": 0.1}},
        "raft-h": {"family": ["raft", "appendix_h"], "name": "raft", "settings": {"lr": 1e-5}},  # another variant
        "mine": {"curve": "sft"},  # a curve named by hand, whose name the sft family has already
    }
    g = group_curves(members)
    assert g["sft-a"] == {"curve": "sft", "setting": {"lr": 3e-6}} and g["sft-b"]["setting"] == {"lr": 1e-5}
    assert g["raft"] == {"curve": "raft", "setting": {"kl_lambda": None}} and g["raft-0.1"]["curve"] == "raft"
    assert g["raft-h"] == {"curve": "raft-h", "setting": {}}  # a curve of one run: named by its label
    assert g["mine"]["curve"] == "sft (mine)"
    assert format_setting({"kl_lambda": None, "lr": 1e-05}) == "kl_lambda EMA, lr 1e-05" and format_setting({}) == "-"


def _trained(tmp_path, name, r, config, losses, ifeval=None):
    """An eval folder of a model saved by a training run: train-<name>/{model, config.json, metrics.jsonl}."""
    model = tmp_path / f"train-{name}" / "model"
    model.mkdir(parents=True)
    (model / "raftune.json").write_text(json.dumps({"method": config["method"]}))
    (model.parent / "config.json").write_text(json.dumps({"model": "default", "data": "fused.jsonl", **config}))
    (model.parent / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "eval_domain_loss": losses[0]}) + "\n" + json.dumps({"step": 1, "lr": 1e-5, "ce": 2.0}) + "\n"
        + json.dumps({"step": 2, "eval_domain_loss": losses[1]}) + "\n")
    folder = write(tmp_path, name, r)
    (folder / "results.json").write_text(json.dumps({"suites": r, "config": {"model": str(model)}}))
    return folder


def _wise(tmp_path, name, r, tuned, alpha):
    model = tmp_path / f"wise-{name}" / f"wise-{alpha:g}"
    model.mkdir(parents=True)
    (model / "raftune.json").write_text(json.dumps({"method": "wise", "alpha": alpha, "tuned_model": str(tuned)}))
    folder = write(tmp_path, name, r)
    (folder / "results.json").write_text(json.dumps({"suites": r, "config": {"model": str(model)}}))
    return folder


def test_compare_draws_each_method_as_a_curve_with_the_front_marked(tmp_path, monkeypatch):
    """Runs read from their training folders: sft at two learning rates is one curve, sft at two budgets
    another (when TrainConfig records one), raft a single point; the table gets each run's setting, gain and
    Pareto flags, the plot one line per curve."""
    from raftune import compare as compare_module

    base = write(tmp_path, "base", results(0.1, 0.40, 0.25, 6, kl=0.0))
    folders, labels = [base], ["base"]
    for name, cfg, losses, ifeval, kl in [
        ("sft-lo", {"method": "sft", "learning_rate": 3e-6}, (2.5, 2.4), 0.38, 0.02),
        ("sft-hi", {"method": "sft", "learning_rate": 3e-5}, (2.5, 2.0), 0.30, 0.06),
        ("sft-b1", {"method": "sft", "learning_rate": 1e-5, "forgetting_budget": 0.01}, (2.5, 2.35), 0.39, 0.01),
        ("sft-b2", {"method": "sft", "learning_rate": 1e-5, "forgetting_budget": 0.03}, (2.5, 2.3), 0.37, 0.03),
        ("raft", {"method": "raft", "learning_rate": 1e-5, "kl_lambda": None}, (2.5, 2.45), 0.39, 0.025),
    ]:
        folders.append(_trained(tmp_path, name, results(0.1, ifeval, 0.25, 6, kl=kl), cfg, losses))
        labels.append(name)
    folders.append(_wise(tmp_path, "wise-0.5", results(0.1, 0.39, 0.25, 6, kl=0.01),
                         tmp_path / "train-sft-hi" / "model", 0.5))
    folders.append(_wise(tmp_path, "wise-0.25", results(0.1, 0.395, 0.25, 6, kl=0.005),
                         tmp_path / "train-sft-hi" / "model", 0.25))
    labels += ["wise-0.5", "wise-0.25"]
    drawn = {}
    real_save = compare_module._save

    def spy(fig, path):
        if path.name == "tradeoff_curves.png":
            for ax in fig.axes:
                drawn[ax.get_title()] = {line.get_label(): list(zip(*line.get_data())) for line in ax.lines
                                         if not line.get_label().startswith("_")}
        return real_save(fig, path)

    monkeypatch.setattr(compare_module, "_save", spy)
    out = compare(folders, labels, tmp_path / "cmp")
    t = out["tradeoff"]
    assert t["curves"] == {"base": ["base"], "sft": ["sft-lo", "sft-hi"], "sft budget": ["sft-b1", "sft-b2"],
                           "raft": ["raft"], "wise(sft-hi)": ["wise-0.5", "wise-0.25"]}
    p = t["points"]
    assert p["sft-lo"]["setting"] == {"lr": 3e-6} and p["sft-b2"]["setting"] == {"forgetting_budget": 0.03}
    assert p["raft"]["setting"] == {} and p["wise-0.25"]["setting"] == {"alpha": 0.25}  # one run: no setting varies
    assert p["sft-hi"]["domain_gain"] == pytest.approx(0.5) and p["base"]["domain_gain"] == 0.0
    assert p["wise-0.5"]["domain_gain"] is None  # a post-hoc model outside raftune run: no held-out loss here
    assert p["sft-hi"]["IFEval strict forgetting"] == pytest.approx(0.25)
    # drift: base (0, 0), sft-b1 (0.01, 0.15), sft-lo (0.02, 0.1) dominated by sft-b1, sft-b2 (0.03, 0.2),
    # raft (0.025, 0.05) dominated, sft-hi (0.06, 0.5)
    assert t["front"]["drift KL"] == ["base", "sft-hi", "sft-b1", "sft-b2"]
    assert p["sft-lo"]["pareto"]["drift KL"] is False and p["wise-0.5"]["pareto"]["drift KL"] is None
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| sft-b2 | sft budget | forgetting_budget 0.03 | 0.2 | 0.03 | 7.5 | drift KL, IFEval strict |" in md
    assert "| raft | raft | - | 0.05 | 0.025 | 2.5 | - |" in md
    saved = _strict((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["tradeoff"]["front"] == t["front"]
    assert str(tmp_path / "cmp" / "tradeoff_curves.png") in out["plots"]
    assert set(drawn) == {"Domain gain vs drift KL", "Domain gain vs IFEval strict forgetting"}
    lines = drawn["Domain gain vs drift KL"]
    assert set(lines) == {"sft", "sft budget", "raft"}  # wise has no gain to draw
    assert lines["sft"] == [(0.02, pytest.approx(0.1)), (0.06, pytest.approx(0.5))]  # in order of forgetting


def test_points_given_by_the_pipeline_are_used_and_differing_base_losses_said(tmp_path, caplog):
    folders = [write(tmp_path, "base", results(0.1, 0.4, 0.25, 6, kl=0.0)),
               write(tmp_path, "a", results(0.1, 0.3, 0.25, 6, kl=0.05)),
               write(tmp_path, "b", results(0.1, 0.35, 0.25, 6, kl=0.02))]
    points = {"a": {"curve": "wise(sft)", "setting": {"alpha": 1.0}, "base_domain_loss": 2.5, "domain_loss": 2.0},
              "b": {"curve": "wise(sft)", "setting": {"alpha": 0.5}, "base_domain_loss": 2.6, "domain_loss": 2.3}}
    out = compare(folders, None, tmp_path / "cmp", points=points)
    t = out["tradeoff"]
    assert t["curves"]["wise(sft)"] == ["a", "b"] and t["points"]["b"]["domain_gain"] == pytest.approx(0.3)
    assert t["front"]["drift KL"] == ["base", "a", "b"]
    assert "held-out losses the gains start from differ (a 2.5, b 2.6)" in caplog.text
    assert "note: the held-out losses" in out["markdown"]


def test_no_trade_off_without_domain_losses(tmp_path):
    folders = [write(tmp_path, n, results(0.1, 0.4, 0.25, 6, kl=0.01)) for n in ("base", "sft")]
    out = compare(folders, None, tmp_path / "cmp")
    assert "Trade-off" not in out["markdown"] and not any(p.endswith("tradeoff_curves.png") for p in out["plots"])
    assert out["tradeoff"]["points"]["sft"]["domain_gain"] is None and out["tradeoff"]["front"]["drift KL"] == []


def test_runs_of_one_curve_at_the_same_point_are_drawn(tmp_path):
    """Two alphas that gave the same drift and gain (a tiny model barely moves) are two points of one line."""
    folders = [write(tmp_path, n, results(0.1, 0.4, 0.25, 6, kl=kl)) for n, kl in [("base", 0.0), ("a", 0.01), ("b", 0.01)]]
    points = {label: {"curve": "wise(sft)", "setting": {"alpha": alpha}, "base_domain_loss": 2.5, "domain_loss": 2.4}
              for label, alpha in [("a", 0.5), ("b", 0.75)]}
    out = compare(folders, None, tmp_path / "cmp", points=points)
    assert str(tmp_path / "cmp" / "tradeoff_curves.png") in out["plots"]
    assert out["tradeoff"]["front"]["drift KL"] == ["base", "a", "b"]


def test_a_budgeted_run_gains_what_its_saved_model_holds(tmp_path):
    """With a forgetting budget, model/ may be an earlier point than the last (config.json's budget says
    which): its gain is that point's; a run that missed its budget is marked so in the table."""
    from raftune.compare import training_outcome

    base = write(tmp_path, "base", results(0.1, 0.40, 0.25, 6, kl=0.0))
    met = _trained(tmp_path, "met", results(0.1, 0.38, 0.25, 6, kl=0.01),
                   {"method": "sft", "learning_rate": 1e-5, "forgetting_budget": 0.01,
                    "budget": {"met": True, "step": 1, "eval_domain_loss": 2.3, "drift_kl": 0.009}}, (2.5, 2.1))
    missed = _trained(tmp_path, "missed", results(0.1, 0.30, 0.25, 6, kl=0.05),
                      {"method": "sft", "learning_rate": 1e-5, "forgetting_budget": 0.02,
                       "budget": {"met": False, "step": 2, "why": "not met"}}, (2.5, 2.0))
    assert training_outcome(tmp_path / "train-met") == {"base_domain_loss": 2.5, "domain_loss": 2.3, "budget_met": True}
    assert training_outcome(tmp_path / "train-missed")["domain_loss"] == 2.0
    out = compare([base, met, missed], None, tmp_path / "cmp")
    assert out["tradeoff"]["points"]["met"]["domain_gain"] == pytest.approx(0.2)
    assert "| missed | sft budget | forgetting_budget 0.02 (budget not met) |" in out["markdown"]
