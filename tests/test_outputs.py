"""Output folders: nothing the user has is deleted or overwritten, one process writes a run at a time,
nothing stale or of other inputs is reused, and no checkpoint file runs code (issue 14, classes 1-3)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from raftune import outputs
from raftune.cli import app
from raftune.outputs import OutputError

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what a user would lose."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- claim, key, lock ------------------------------------------------------------------------------------


def test_claim_rules(tmp_path):
    new = outputs.claim(tmp_path / "a" / "b", "eval", "k1", other_key="refuse")
    assert new.previous_key is None and not new.complete and outputs.read_manifest(tmp_path / "a" / "b")["kind"] == "eval"
    assert outputs.claim(tmp_path / "a" / "b", "eval", "k1", other_key="refuse").same  # its own output, same key
    with pytest.raises(OutputError, match="holds an eval output of other settings"):
        outputs.claim(tmp_path / "a" / "b", "eval", "k2", other_key="refuse")
    redo = outputs.claim(tmp_path / "a" / "b", "eval", "k2", other_key="redo")
    assert redo.previous_key == "k1" and not redo.same and outputs.read_manifest(tmp_path / "a" / "b")["key"] == "k2"
    with pytest.raises(OutputError, match="holds a raftune eval output, not a train one"):
        outputs.claim(tmp_path / "a" / "b", "train", "k2", other_key="redo")
    (tmp_path / "empty").mkdir()
    assert outputs.claim(tmp_path / "empty", "fapm", "k", other_key="refuse").previous_key is None  # nothing to lose
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"mine: exists and holds files raftune did not write as output \(notes.txt\)"):
        outputs.claim(tmp_path / "mine", "fapm", "k", other_key="redo")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        outputs.claim(tmp_path / "file", "compare", "k", other_key="redo")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "x"


def test_a_second_writer_is_refused_at_once(tmp_path):
    outputs.claim(tmp_path / "run", "train", "k", other_key="refuse")
    with outputs.locked(tmp_path / "run"):
        with pytest.raises(OutputError, match=r"another raftune process \(pid \d+\) is writing it"):
            with outputs.locked(tmp_path / "run"):
                pass
    with outputs.locked(tmp_path / "run"):  # released when the first one ended
        pass


def test_model_fingerprint_follows_content_not_path(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    from safetensors.torch import save_file

    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, str(folder / "model.safetensors"))
    first = outputs.model_fingerprint(str(folder))
    assert outputs.model_fingerprint(str(folder)) == first
    outputs.write_manifest(folder, "fapm", "k")  # who wrote it is not what it holds
    assert outputs.model_fingerprint(str(folder)) == first
    save_file({"w": torch.ones(4)}, str(folder / "model.safetensors"))  # same size, same name, other weights
    assert outputs.model_fingerprint(str(folder)) != first
    assert outputs.model_fingerprint("http://h:1/v1#m") == "server:http://h:1/v1#m"


# --- training ---------------------------------------------------------------------------------------------


def write_fused(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"question": f"What does f{i} do?", "answer": f"f{i} returns {i}."}) + "\n"
                            for i in range(n)))
    return path


def train_cfg(tmp_path, model, **kw):
    from raftune.train import TrainConfig

    base = dict(data=str(write_fused(tmp_path / "fused.jsonl")), model=str(model), out_dir=str(tmp_path / "runs"),
                batch_size=4, max_steps=2, rollout_max_new_tokens=4, device="cpu", lr=1e-3, top_k=16, save_every=1,
                method="sft")
    base.update(kw)
    return TrainConfig(**base)


def test_train_with_a_fixed_name_never_resumes_another_config(tiny_model_dir, tmp_path):
    from raftune.train import train

    run = train(train_cfg(tmp_path, tiny_model_dir, name="exp", max_steps=1))
    before = tree(run)
    with pytest.raises(OutputError, match="holds a train output of other settings"):
        train(train_cfg(tmp_path, tiny_model_dir, name="exp", max_steps=1, method="raft", lr=5e-4))
    assert tree(run) == before  # its checkpoints and model untouched


def test_two_trainings_of_one_folder_never_run_at_once(tiny_model_dir, tmp_path):
    from raftune.train import train

    cfg = train_cfg(tmp_path, tiny_model_dir, name="exp", max_steps=1)
    run = Path(cfg.out_dir) / "exp"
    run.mkdir(parents=True)
    with outputs.locked(run):  # as a first `raftune train` in progress holds it
        with pytest.raises(OutputError, match="another raftune process"):
            train(cfg)
    assert not (run / "metrics.jsonl").exists()


def test_a_tampered_checkpoint_runs_nothing_and_is_refused(tiny_model_dir, tmp_path):
    from raftune.train import train

    cfg = train_cfg(tmp_path, tiny_model_dir, max_steps=2, save_every=1, keep_checkpoints=5)
    run = train(cfg)
    marker = tmp_path / "pwned"

    class Payload:  # what a tampered optim_rng.pt holds: unpickling it would create the marker file
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    ckpt = run / "checkpoint-2"
    blob = torch.load(ckpt / "optim_rng.pt", weights_only=True)
    blob["scheduler"] = Payload()
    torch.save(blob, ckpt / "optim_rng.pt")
    (run / "model").rename(run / "model-done")  # as if the run had stopped after its last checkpoint
    from raftune.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"checkpoint-2: not a checkpoint raftune wrote, or damaged .*nothing in it was run"):
        train(cfg)  # the same command again: it resumes from the latest checkpoint
    assert not marker.exists()
    # a plain pickle (no torch zip) is refused the same way
    (ckpt / "optim_rng.pt").write_bytes(pickle.dumps(Payload()))
    result = runner.invoke(app, ["train", "--data", cfg.data, "--model", cfg.model, "--out-dir", cfg.out_dir, "--method", "sft",
                                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--device", "cpu",
                                 "--set", "save_every=1", "--set", "keep_checkpoints=5", "--set", "top_k=16",
                                 "--set", "rollout_max_new_tokens=4"])
    assert result.exit_code == 2 and "not a checkpoint raftune wrote" in flat(result.output), result.output
    assert "Traceback" not in result.output and not marker.exists()


def test_a_checkpoint_of_another_run_is_not_resumed(tiny_model_dir, tmp_path):
    from raftune.checkpoint import CheckpointError, read_state

    from raftune.train import train

    run = train(train_cfg(tmp_path, tiny_model_dir, max_steps=1))
    state = read_state(run / "checkpoint-1")
    assert state["format"] == 2 and state["run_key"] in run.name
    with pytest.raises(CheckpointError, match="a checkpoint of another run"):
        read_state(run / "checkpoint-1", key="someotherkey")


# --- post-hoc models -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("tuned")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return out


def test_fapm_out_never_deletes_a_folder_it_did_not_write(tiny_model_dir, tuned, tmp_path):
    user = tmp_path / "my-folder"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    (user / "sub" / "data.csv").write_text("1,2")
    train_run = tmp_path / "runs" / "train-sft-x"  # a training run: its model and its checkpoints
    (train_run / "checkpoint-4").mkdir(parents=True)
    (train_run / "checkpoint-4" / "trainable.safetensors").write_bytes(b"w")
    (train_run / "model").symlink_to(tuned, target_is_directory=True)
    before_user, before_run = tree(user), tree(train_run / "checkpoint-4")
    for out, fragment in [(user, "holds files raftune did not write as output"),
                          (train_run, "holds files raftune did not write as output")]:
        result = runner.invoke(app, ["fapm", "--base", str(tiny_model_dir), "--tuned", str(train_run / "model"),
                                     "--keep", "0.5", "--out", str(out)])
        assert result.exit_code == 2 and fragment in flat(result.output), result.output
        assert "Traceback" not in result.output
    result = runner.invoke(app, ["wise", "--base", str(tiny_model_dir), "--tuned", str(tuned), "--out", str(tmp_path),
                                 "--alpha", "0.5"])
    assert result.exit_code == 0, result.output  # a parent folder: wise-0.5 is made inside it, nothing else touched
    assert tree(user) == before_user and tree(train_run / "checkpoint-4") == before_run
    outputs.claim(tmp_path / "an-eval", "eval", "k", other_key="redo")
    result = runner.invoke(app, ["fapm", "--base", str(tiny_model_dir), "--tuned", str(tuned), "--out", str(tmp_path / "an-eval")])
    assert result.exit_code == 2 and "holds a raftune eval output, not a fapm one" in flat(result.output)


def test_templates_and_demo_out_never_overwrite_a_users_file(tmp_path):
    edited = tmp_path / "templates.yaml"
    assert runner.invoke(app, ["templates", "--out", str(edited)]).exit_code == 0
    assert runner.invoke(app, ["templates", "--out", str(edited)]).exit_code == 0  # the same content again: fine
    edited.write_text(edited.read_text().replace("Score:", "Grade:"))  # the user's edits
    before = edited.read_bytes()
    result = runner.invoke(app, ["templates", "--out", str(edited)])
    assert result.exit_code == 2 and "exists with other content; it is left as it is" in flat(result.output)
    assert edited.read_bytes() == before
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"question": "q", "answer": "a"}\n')
    result = runner.invoke(app, ["demo", "--out", str(mine)])
    assert result.exit_code == 2 and mine.read_text() == '{"question": "q", "answer": "a"}\n'


def test_a_posthoc_model_is_made_again_when_what_made_it_changes(tiny_model_dir, tuned, tmp_path):
    from raftune.posthoc import fapm

    out = tmp_path / "fapm"
    fapm(str(tiny_model_dir), str(tuned), str(out), keep=0.1)
    first = load_file(str(out / "model.safetensors"))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    fapm(str(tiny_model_dir), str(tuned), str(out), keep=0.1)  # the same result: kept, not made again
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    fapm(str(tiny_model_dir), str(tuned), str(out), keep=0.9)  # another setting: made again
    assert json.loads((out / "raftune.json").read_text())["keep"] == 0.9
    assert any(not torch.equal(first[k], v) for k, v in load_file(str(out / "model.safetensors")).items())


def test_run_remakes_a_posthoc_entry_whose_setting_changed(tiny_model_dir, tuned, tmp_path):
    from raftune.pipeline import RunConfig, _posthoc

    refine_dir = tmp_path / "runs" / "refine-abc"
    refine_dir.mkdir(parents=True)
    cfg = RunConfig.from_dict({"refine": {"data": "demo", "model": str(tiny_model_dir)}})
    first = _posthoc(cfg, {"name": "f", "posthoc": "fapm", "from": "sft", "keep": 0.2}, refine_dir, str(tuned))
    assert json.loads((Path(first["model"]) / "raftune.json").read_text())["keep"] == 0.2
    again = _posthoc(cfg, {"name": "f", "posthoc": "fapm", "from": "sft", "keep": 0.7}, refine_dir, str(tuned))
    assert again["model"] == first["model"] and json.loads((Path(again["model"]) / "raftune.json").read_text())["keep"] == 0.7


# --- evaluation -------------------------------------------------------------------------------------------


def test_eval_reuses_results_by_model_content_not_path(tiny_model_dir, tuned, tmp_path):
    """The issue's case: rerun fapm with another --keep to the same --out, then the same eval."""
    def fapm_cmd(keep):
        r = runner.invoke(app, ["fapm", "--base", str(tiny_model_dir), "--tuned", str(tuned), "--keep", keep,
                                "--out", str(tmp_path / "pruned")])
        assert r.exit_code == 0, r.output

    def eval_cmd():
        r = runner.invoke(app, ["eval", "--model", str(tmp_path / "pruned"), "--base-model", str(tiny_model_dir),
                                "--suite", "weights", "--name", "p", "--out-dir", str(tmp_path / "runs")])
        assert r.exit_code == 0, r.output
        return json.loads((tmp_path / "runs" / "eval-p" / "results.json").read_text())["suites"]["weights"]

    fapm_cmd("0.05")
    small = eval_cmd()
    assert eval_cmd() == small  # same content: reused
    fapm_cmd("1.0")
    full = eval_cmd()
    assert full["mean"] > small["mean"]  # the new model's numbers, not the old one's


def test_completions_are_keyed_by_the_model_content(tmp_path):
    from raftune.generation import CachedGenerator, Completion, CompletionLog, SamplingParams

    class Echo:
        name = "same/path"

        def __init__(self, word):
            self.word, self.calls = word, 0

        def chat(self, convs, params):
            self.calls += len(convs)
            return [Completion(self.word, 1, 1, "stop") for _ in convs]

    convs, params = [[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=4)
    log = CompletionLog(tmp_path / "c.jsonl")
    assert CachedGenerator(Echo("old"), log, identity="folder:aaa").chat(convs, params)[0].text == "old"
    new = Echo("new")
    assert CachedGenerator(new, CompletionLog(tmp_path / "c.jsonl"), identity="folder:bbb").chat(convs, params)[0].text == "new"
    assert new.calls == 1
    same = Echo("never asked")
    assert CachedGenerator(same, CompletionLog(tmp_path / "c.jsonl"), identity="folder:bbb").chat(convs, params)[0].text == "new"
    assert same.calls == 0


# --- refine shard logs -----------------------------------------------------------------------------------------


def test_merge_refuses_a_shard_log_of_another_run(tmp_path):
    from raftune.refine import MergeError, merge

    run = tmp_path / "refine-x"
    outputs.claim(run, "refine", "thiskey", other_key="refuse")
    (run / "targets.json").write_text(json.dumps(["k0"]))
    row = {"key": "k0", "run": "otherkey"}
    (run / "records.shard-1-of-2.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(MergeError, match=r"records.shard-1-of-2.jsonl: records of another refine run \(key otherkey"):
        merge(run)
