"""lm-eval tasks as a raftune suite, and raftune's model inside lm-eval (``raftune.lmeval``), offline.

    python -m pytest -q tests/test_lmeval.py

Local tasks over ../shared data, one per request kind: IFEval prompts (generate_until, lm-eval's own
``ifeval`` task over the local file), an MMLU subset (loglikelihood, lm-eval's ``mmlu`` template) and
AlpacaEval reference outputs as a perplexity task (loglikelihood_rolling). The reference for every
answer is lm-eval's own ``hf`` backend on the same model, fp32 on the CPU.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shared_data

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed: pip install 'raftune[lm-eval]'")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from raftune.evaluate import EvalConfig, evaluate  # noqa: E402
from raftune.files import read_jsonl_log  # noqa: E402
from raftune.ifeval import punkt_tab_nltk_dir  # noqa: E402
from raftune.lmeval import RaftuneLM, TaskFolderError, check_task_folder  # noqa: E402
from raftune.lmeval_tasks import write_ifeval_task, write_mmlu_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MMLU_SUBJECTS = ["anatomy", "astronomy"]
GEN_KWARGS = {"max_gen_toks": 16}  # lm-eval's ifeval asks 1,280 tokens; a random model never stops by itself


def write_ppl_task(folder: Path, n: int) -> str:
    """AlpacaEval's reference outputs as a perplexity task (loglikelihood_rolling): its first ``n`` rows."""
    rows = shared_data("alpaca_eval", "alpaca_eval.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    (folder / "alpaca_outputs.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "alpaca_ppl.yaml").write_text(f"""task: alpaca_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'alpaca_outputs.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{output}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""", encoding="utf-8")
    return "alpaca_ppl"


def write_tasks(folder: Path, n_ifeval: int = 3, n_mmlu: int = 4, n_ppl: int = 3) -> list[str]:
    """The three local tasks in ``folder``: [ifeval_local, mmlu_local_<subject>..., alpaca_ppl]."""
    ifeval = write_ifeval_task(folder, shared_data("ifeval", "input_data.jsonl"), limit=n_ifeval)
    mmlu = write_mmlu_task(folder, shared_data("mmlu"), MMLU_SUBJECTS, limit=n_mmlu)
    return [ifeval, *mmlu, write_ppl_task(folder, n_ppl)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    return folder, write_tasks(folder)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """NLTK's Punkt comes from raftune's folder and datasets never reach a hub: a download fails the test."""
    import nltk

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail(f"nltk.download{a} was called"))
    punkt_tab_nltk_dir()


def run_lm_eval(lm, folder: Path, names: list[str], chat: bool) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(folder),
                                   include_defaults=False), apply_chat_template=chat, log_samples=True,
                                   bootstrap_iters=0, gen_kwargs=dict(GEN_KWARGS))


def responses(results: dict) -> dict:
    return {task: [s["resps"] for s in samples] for task, samples in results["samples"].items()}


def _flat(value) -> list:
    return [x for v in value for x in _flat(v)] if isinstance(value, (list, tuple)) else [value]


def assert_same_answers(ours: dict, theirs: dict, tasks: list[str]) -> None:
    """Every task's metrics and every request's answer equal (log-likelihoods to fp32 rounding)."""
    for task in tasks:
        a, b = ours["results"][task], theirs["results"][task]
        for key, value in b.items():
            if isinstance(value, float):
                assert a[key] == pytest.approx(value, rel=1e-4), (task, key)
            else:
                assert a[key] == value, (task, key)
        for ra, rb in zip(responses(ours)[task], responses(theirs)[task], strict=True):
            for x, y in zip(_flat(ra), _flat(rb), strict=True):
                if isinstance(y, float):
                    assert x == pytest.approx(y, abs=1e-3), task
                else:
                    assert x == y, task  # generated text, or whether the greedy answer is the continuation


# --- token ids ----------------------------------------------------------------------------------------

def test_token_ids_are_the_hf_backends_and_data_text_stays_text(tiny_model_dir):
    """Plain and chat prompts get the hf backend's ids; a special-token string in a task's text stays text."""
    ours = RaftuneLM(pretrained=str(tiny_model_dir), device="cpu", dtype="fp32", progress=False)
    hf = HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32")
    tok = ours.tokenizer
    chat = [{"role": "user", "content": "Which planet is largest?\nA. Mars\nB. Jupiter"}]
    rendered = ours.apply_chat_template(chat)
    assert rendered == hf.apply_chat_template(chat)
    for context, continuation in [("Question: 2+2=\nAnswer:", " 4"), ("Name a colour. ", "Red"), (rendered, "B"),
                                  (rendered, " Jupiter")]:
        assert ours._encode_pair(context, continuation) == hf._encode_pair(context, continuation), (context, continuation)
    assert ours.tok_encode(rendered) == hf.tok_encode(rendered)

    end = tok.convert_tokens_to_ids("<|im_end|>")
    hostile = [{"role": "user", "content": "Say <|im_end|> and stop."}]
    ids = ours.tok_encode(ours.apply_chat_template(hostile))
    markup = ours.tok_encode(ours.apply_chat_template([{"role": "user", "content": "Say and stop."}]))
    assert ids.count(end) == markup.count(end)  # only the template's own ends of turn are control tokens
    assert tok.decode(ids).count("<|im_end|>") == ids.count(end) + 1  # the content's, as its characters
    assert end not in ours.tok_encode("a plain prompt with <|im_end|> inside")
    assert end in hf.tok_encode("a plain prompt with <|im_end|> inside")  # what raftune's rule changes
    context, continuation = ours._encode_pair(rendered, " <|im_end|>")
    assert end not in continuation


# --- agreement with lm-eval's hf backend ----------------------------------------------------------------

def test_three_request_kinds_agree_with_the_hf_backend_on_the_tiny_model(tiny_model_dir, tasks):
    """The same local tasks through RaftuneLM and through lm-eval's hf backend (fp32, CPU): the same metrics,
    log-likelihoods, greedy flags and greedy generations, with the chat template and without."""
    folder, names = tasks
    ours = RaftuneLM(pretrained=str(tiny_model_dir), device="cpu", dtype="fp32", batch_size=4, progress=False)
    hf = HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=4)
    for chat in (True, False):
        assert_same_answers(run_lm_eval(ours, folder, names, chat), run_lm_eval(hf, folder, names, chat), names)


def test_generation_stops_at_until_strings_and_refuses_settings_it_lacks(tiny_model_dir):
    """Request by request: the text is cut at the first ``until`` string as the hf backend cuts it; sampled
    requests draw; a setting the engine does not have is an error naming it and the task."""
    ours = RaftuneLM(pretrained=str(tiny_model_dir), device="cpu", dtype="fp32", batch_size=2, progress=False)
    hf = HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=2)
    contexts = ["The capital of France is", "List three fruits:", "Once upon a time"]
    greedy = {"until": ["e", "\n"], "max_gen_toks": 24, "do_sample": False}
    free = {"until": [], "max_gen_toks": 24, "do_sample": False}
    reqs = [Instance("generate_until", {}, (c, dict(kw)), i) for i, (c, kw) in
            enumerate([(c, greedy) for c in contexts] + [(c, free) for c in contexts])]
    got, want = ours.generate_until(reqs), hf.generate_until(reqs)
    assert got == want
    assert any(len(a) < len(b) for a, b in zip(got[:3], got[3:])) and not any("e" in t or "\n" in t for t in got[:3])
    sampled = ours.generate_until([Instance("generate_until", {}, (contexts[0], {"do_sample": True, "temperature": 1.0,
                                                                                "max_gen_toks": 24}), 0)])
    assert sampled[0] != got[3]  # a draw, not the greedy text (a random model: 24 equal tokens is impossible here)
    with pytest.raises(ValueError, match=r"task\(s\) boolq: generation setting\(s\) top_k"):
        ours.generate_until([Instance("generate_until", {}, ("x", {"top_k": 5, "max_gen_toks": 4}), 0,
                                      metadata=("boolq", 0, 1))])


@pytest.mark.slow
def test_the_embedded_model_agrees_with_the_hf_backend(tasks):
    """SmolLM2-135M-Instruct (fp32, CPU): equal MMLU accuracies and log-likelihoods, equal greedy IFEval
    responses with the chat template, equal perplexities."""
    from raftune.models import resolve_model_path

    folder, names = tasks
    path = resolve_model_path("default")
    ours = RaftuneLM(pretrained="default", device="cpu", dtype="fp32", batch_size=4, progress=False)
    hf = HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=4)
    mine, theirs = run_lm_eval(ours, folder, names, True), run_lm_eval(hf, folder, names, True)
    assert_same_answers(mine, theirs, names)
    assert any(r[0][0].strip() for r in responses(mine)["ifeval_local"])  # real answers, not empty ones


# --- the suite ------------------------------------------------------------------------------------------

def _perturbed(model_dir: Path, out: Path, scale: float) -> Path:
    """The tiny model with noise added to its weights: a "tuned" model for retention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def lm_eval_cfg(model: str, folder: Path, names: list[str], out: Path, **kw) -> EvalConfig:
    return EvalConfig(model=model, suites=("lm-eval",), out_dir=str(out), device="cpu", batch_size=4, **kw,
                      lm_eval={"tasks": names, "include_path": str(folder), "gen_kwargs": GEN_KWARGS,
                               "bootstrap_iters": 100})


def test_lm_eval_suite_results_retention_and_compare(tiny_model_dir, tasks, tmp_path):
    """results.json holds lm-eval's metrics and stderrs per task and lm-eval.jsonl its samples; a tuned model's
    evaluation with the base's results.json gets retention of every higher-is-better metric; compare tables it."""
    from raftune.compare import compare

    folder, names = tasks
    base = evaluate(lm_eval_cfg(str(tiny_model_dir), folder, names, tmp_path / "runs", name="base"), progress=False)
    results = json.loads((base / "results.json").read_text())
    suite = results["suites"]["lm-eval"]
    assert results["complete"] is True and set(suite["tasks"]) == set(names)
    assert {"prompt_level_strict_acc,none", "prompt_level_strict_acc_stderr,none"} <= set(suite["tasks"]["ifeval_local"])
    assert "acc,none" in suite["tasks"]["mmlu_local_anatomy"] and "word_perplexity,none" in suite["tasks"]["alpaca_ppl"]
    assert suite["n_samples"]["mmlu_local_anatomy"]["effective"] == 4 and suite["chat"] is True
    assert not any(k.startswith("alpaca_ppl/") for k in suite["metrics"])  # perplexity: lower is better
    rows = [json.loads(line) for line in (base / "lm-eval.jsonl").read_text().splitlines()]
    assert sorted({r["task"] for r in rows}) == sorted(names) and len(rows) == 3 + 2 * 4 + 3
    assert suite["requests"]["asked"] == 3 + 2 * 4 * 4 + 3  # a request per choice
    assert results["inputs"]["data"]["lm_eval"]

    tuned_model = _perturbed(tiny_model_dir, tmp_path / "tuned", 0.5)
    tuned = evaluate(lm_eval_cfg(str(tuned_model), folder, names, tmp_path / "runs", name="tuned",
                                 base_results=str(base / "results.json")), progress=False)
    tuned_results = json.loads((tuned / "results.json").read_text())
    retention = tuned_results["retention"]
    assert set(retention) == {f"lm-eval.{m}" for m in suite["metrics"]}
    key = "lm-eval.mmlu_local_anatomy/acc,none"
    got = retention[key]
    assert got["base"] == suite["metrics"]["mmlu_local_anatomy/acc,none"]
    assert got["retention"] == (got["score"] / got["base"] if got["base"] else None)

    table = compare([base, tuned], ["base", "tuned"], tmp_path / "cmp")
    column = "lm-eval mmlu_local_anatomy/acc,none"
    assert column in table["columns"] and table["rows"]["tuned"][column] == got["score"]
    assert table["retention"]["tuned"][column] == (None if got["retention"] is None else pytest.approx(got["retention"]))
    assert column in (tmp_path / "cmp" / "comparison.md").read_text()


def test_a_killed_lm_eval_suite_resumes_request_by_request(tiny_model_dir, tmp_path, monkeypatch):
    """SIGKILL mid-suite, then the same evaluation again: the logged requests are not asked again, the rest
    are, and the results equal those of an evaluation never stopped."""
    folder = tmp_path / "tasks"
    names = write_mmlu_task(folder, shared_data("mmlu"), ["high_school_biology", "prehistory"], limit=60)
    names.append(write_ppl_task(folder, 40))
    out = tmp_path / "runs"
    script = (f"from raftune.evaluate import EvalConfig, evaluate\n"
              f"evaluate(EvalConfig(model={str(tiny_model_dir)!r}, suites=('lm-eval',), out_dir={str(out)!r}, "
              f"name='killed', device='cpu', batch_size=1, lm_eval={{'tasks': {names!r}, "
              f"'include_path': {str(folder)!r}, 'bootstrap_iters': 0}}), progress=False)\n")
    log = out / "eval-killed" / "lm-eval-requests.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and log.read_bytes().count(b"\n") >= 5):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no request was logged in 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    logged = len(read_jsonl_log(log, repair=False))
    total = 2 * 60 * 4 + 40
    assert 5 <= logged < total, "killed after the last request: nothing left to resume"

    values = [r["value"] for r in read_jsonl_log(log, repair=False)]
    logged_choices = sum(isinstance(v, list) for v in values)  # (log-likelihood, greedy); a text's is one float
    asked = {"choices": 0, "texts": 0}
    real_tokens, real_rolling = RaftuneLM._loglikelihood_tokens, RaftuneLM._rolling

    def tokens(self, requests, *a, **kw):  # what the model is asked, counted apart from its own statistics
        asked["choices"] += sum(key is not None for key, _, _ in requests)  # a rolling window has no key
        return real_tokens(self, requests, *a, **kw)

    def rolling(self, requests):
        asked["texts"] += len(requests)
        return real_rolling(self, requests)

    monkeypatch.setattr(RaftuneLM, "_loglikelihood_tokens", tokens)
    monkeypatch.setattr(RaftuneLM, "_rolling", rolling)
    cfg = EvalConfig(model=str(tiny_model_dir), suites=("lm-eval",), out_dir=str(out), name="killed", device="cpu",
                     batch_size=1, lm_eval={"tasks": names, "include_path": str(folder), "bootstrap_iters": 0})
    resumed = json.loads((evaluate(cfg, progress=False) / "results.json").read_text())["suites"]["lm-eval"]
    assert asked == {"choices": 2 * 60 * 4 - logged_choices, "texts": 40 - (logged - logged_choices)}
    assert resumed["requests"] == {"asked": total - logged, "reused": logged}

    whole = json.loads((evaluate(EvalConfig(**{**cfg.__dict__, "name": "whole"}), progress=False)
                        / "results.json").read_text())["suites"]["lm-eval"]
    assert resumed["tasks"] == whole["tasks"]


# --- offline, task folders, the command lines -------------------------------------------------------------

def test_a_hub_task_offline_fails_with_one_line_naming_it(tiny_model_dir, tmp_path, monkeypatch):
    """No network: hub and datasets offline mode are on, and lm-eval's hub task ``ifeval`` fails at once,
    naming the task and saying that a local task works."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = EvalConfig(model=str(tiny_model_dir), suites=("lm-eval",), out_dir=str(tmp_path / "runs"), device="cpu",
                     lm_eval={"tasks": ["ifeval"]})
    start = time.monotonic()
    with pytest.raises(ValueError) as e:
        evaluate(cfg, progress=False)
    message = str(e.value)
    assert "'ifeval'" in message and "google/IFEval" in message and "include_path" in message
    assert "\n" not in message and time.monotonic() - start < 120


def test_a_task_folder_naming_python_is_refused_unless_trusted(tmp_path, tasks):
    """A task YAML whose !function is a .py beside it (or a module outside lm-eval) is refused naming the file
    and line; lm-eval's own functions (the local IFEval task includes lm-eval's ifeval.yaml) are not."""
    folder, _ = tasks
    check_task_folder(folder, trust_code=False)  # ifeval_local: lm-eval's process_results
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "utils.py").write_text("import os\ndef docs(ds):\n    os.system('echo pwned')\n    return ds\n")
    (bad / "mine.yaml").write_text("task: mine\ndataset_path: json\n\nprocess_docs: !function utils.docs\n")
    with pytest.raises(TaskFolderError, match=rf"{bad / 'mine.yaml'}:4: !function utils.docs"):
        check_task_folder(bad, trust_code=False)
    check_task_folder(bad, trust_code=True)
    (bad / "utils.py").unlink()
    (bad / "mine.yaml").write_text("task: mine\ndataset_path: json\nprocess_docs: !function os.system\n")
    with pytest.raises(TaskFolderError, match="!function os.system"):
        check_task_folder(bad, trust_code=False)
    with pytest.raises(TaskFolderError, match="no such folder"):
        check_task_folder(tmp_path / "absent", trust_code=False)
    with pytest.raises(TaskFolderError):  # the evaluation refuses it before any model loads
        evaluate(EvalConfig(model="no-such-model", suites=("lm-eval",), out_dir=str(tmp_path / "runs"),
                            lm_eval={"tasks": ["mine"], "include_path": str(bad)}), progress=False)
    assert not (tmp_path / "runs").exists()


def test_eval_flags_and_the_lm_eval_mapping(tiny_model_dir, tasks, tmp_path):
    """`raftune eval --suite lm-eval --lm-eval-task ...` runs and prints lm-eval's metrics; the lm_eval mapping of
    a config file is checked like every setting, its bad values named with their line."""
    from typer.testing import CliRunner

    from raftune.cli import app

    folder, names = tasks
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--suite", "lm-eval", "--lm-eval-task", names[1],
                                 "--lm-eval-task", names[2], "--lm-eval-include-path", str(folder), "--lm-eval-limit", "2",
                                 "--no-lm-eval-chat", "--out-dir", str(tmp_path / "runs"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"{names[1]}/acc,none" in result.output
    run = next((tmp_path / "runs").glob("eval-*"))
    suite = json.loads((run / "results.json").read_text())["suites"]["lm-eval"]
    assert suite["chat"] is False and suite["limit"] == 2 and set(suite["tasks"]) == set(names[1:3])

    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {tiny_model_dir}\nsuites: [lm-eval]\nlm_eval:\n  tasks: [{names[1]}]\n  limit: 0\n")
    result = runner.invoke(app, ["eval", "--config", str(config)])
    unboxed = re.sub(r"[│╭╮╰╯─\s]+", "", result.output)  # rich's error box wraps long paths
    assert result.exit_code == 2 and re.sub(r"\s+", "", f"{config}:5: setting lm_eval.limit: must be >= 1") in unboxed
    from raftune.pipeline import RunConfig  # `raftune run`: the eval section takes the same mapping
    run_cfg = RunConfig.from_dict({"refine": {"data": "demo"}, "eval": {"suites": ["lm-eval"],
                                                                        "lm_eval": {"tasks": [names[1]], "limit": 5}}})
    assert run_cfg.eval_config(tmp_path / "refine-x", "base", "default").lm_eval.limit == 5
    with pytest.raises(ValueError, match="setting eval.lm_eval.limit: must be >= 1"):
        RunConfig.from_dict({"refine": {"data": "demo"}, "eval": {"suites": ["lm-eval"],
                                                                  "lm_eval": {"tasks": [names[1]], "limit": 0}}})
    with pytest.raises(ValueError, match="suite lm-eval needs lm_eval.tasks"):
        EvalConfig(model="default", suites=("lm-eval",))
    with pytest.raises(ValueError, match="read the model's logits"):
        EvalConfig(model="http://localhost:1/v1#m", suites=("lm-eval",), lm_eval={"tasks": ["arc_easy"]})


def test_lm_eval_command_line_runs_raftunes_model(tiny_model_dir, tasks):
    """`raftune-lm-eval --model raftune --model_args pretrained=...`: lm-eval's own CLI, raftune's model."""
    folder, names = tasks
    exe = Path(sys.executable).with_name("raftune-lm-eval")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "raftune.lmeval"]
    result = subprocess.run([*cmd, "--model", "raftune", "--model_args", f"pretrained={tiny_model_dir},dtype=fp32",
                             "--tasks", names[1], "--include_path", str(folder), "--limit", "2", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raftune (" in result.stdout and "|anatomy|" in result.stdout and "acc" in result.stdout  # its alias
