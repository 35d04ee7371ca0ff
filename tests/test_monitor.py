"""The forgetting monitor, the anchor and the forgetting budget, end to end on a tiny random Llama."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raftune import forgetting
from raftune import train as train_module
from raftune.train import TrainConfig, train

SMALL = dict(monitor_limit=8, monitor_max_new_tokens=16)  # a cheap monitor where its size is not what is tested


def write_fused(path: Path, n: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"What does f{i} do?", "answer": f"f{i} returns {i} squared."}) + "\n")
    return path


def cfg(tmp_path, model, **kw) -> TrainConfig:
    data = str(write_fused(tmp_path / "fused.jsonl"))
    base = dict(data=data, model=str(model), out_dir=str(tmp_path / "runs"), batch_size=4, max_steps=2,
                rollout_max_new_tokens=6, device="cpu", lr=1e-3, top_k=16, save_every=100, eval_data=data, eval_limit=4)
    return TrainConfig(**{**base, **kw})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def by_step(run: Path, key: str) -> dict[int, float]:
    """``key``'s value at every step that logged it (a step logged twice keeps its last row)."""
    return {r["step"]: r[key] for r in metrics(run) if key in r}


def answers(run: Path, kind: str = "monitor") -> tuple[list[str], list[str]]:
    rows = json.loads((run / f"{kind}_answers.json").read_text())["rows"]
    return [r["prompt"] for r in rows], [r["answer"] for r in rows]


# --- the monitor -------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{"method": "sft"}, {"method": "raft", "lora": True, "merge_lora": False}])
def test_the_monitor_equals_the_drift_suite_on_the_saved_model(tmp_path, tiny_model_dir, extra):
    """After training, the monitor's last value is the drift suite's (``raftune eval --suite drift``) on the
    saved model, the built-in monitor prompts and the base model's greedy answers, which the suite makes
    itself: the same answers, the same number. sft: the original is a frozen copy; LoRA: the adapters off,
    the saved model the adapter itself (the suite loads it unmerged, the monitor's arithmetic exactly;
    the merged model is `test_a_merged_lora_model_moves_the_drift_by_no_more_than_its_rounding`'s)."""
    from raftune.evaluate import EvalConfig, evaluate

    run = train(cfg(tmp_path, tiny_model_dir, lr=1e-2, max_steps=3, monitor_every=1, **SMALL, **extra), progress=False)
    drift = by_step(run, "drift_kl")
    assert sorted(drift) == [0, 1, 2, 3] and drift[0] == 0.0 and drift[3] > 1e-4
    prompts, answers_ = answers(run)
    assert prompts == forgetting.load_general_prompts(forgetting.builtin_prompts("monitor"), limit=8)
    ev = evaluate(EvalConfig(model=str(run / "model"), base_model=str(tiny_model_dir), suites=("drift",),
                             general_data=str(forgetting.builtin_prompts("monitor")), general_limit=8, max_new_tokens=16,
                             out_dir=str(tmp_path / "evals"), name="drift", device="cpu"), progress=False)
    rows = [json.loads(line) for line in (ev / "drift.jsonl").read_text().splitlines()]
    assert [r["base_answer"] for r in rows] == answers_  # the suite's own base answers are the monitor's
    suite = json.loads((ev / "results.json").read_text())["suites"]["drift"]["kl_base_to_tuned"]
    assert drift[3] == pytest.approx(suite, rel=1e-6)


def test_a_merged_lora_model_moves_the_drift_by_no_more_than_its_rounding(tmp_path, tiny_model_dir):
    """LoRA's merged model (the default ``model/``) is W + BA rounded once to fp32, the monitor's model
    computes W x + B(A x): their logits differ by rounding, M at most, and so do their drifts, by no more
    than a bound made of M. KL(p || q) moves by at most 2M ||p - q||_1 + 2M^2 to second order when log q
    moves by at most 2M (the logits by M, their log-sum-exp by M), and mean ||p - q||_1 <= sqrt(2 KL)
    (Pinsker, Jensen); the KL's own fp32 log-softmax rounds each log-probability by eps |log q| or so, at
    most 2 eps ln V in a mean over p. On CI's machine the difference was 1.3e-7 at a drift of 4e-4
    (3e-4 relative), here 3e-8, with M 1.5e-7: the rounding term is the one that counts."""
    import copy
    import math

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raftune.sequences import end_of_turn_id

    run = train(cfg(tmp_path, tiny_model_dir, method="raft", lora=True, merge_lora=False, lr=1e-2, max_steps=3,
                    monitor_every=3, **SMALL), progress=False)
    monitor = by_step(run, "drift_kl")[3]
    prompts, answers_ = answers(run)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    unmerged = PeftModel.from_pretrained(copy.deepcopy(base), str(run / "model")).eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    worst = 0.0

    def merged_scorer(ids_BT, attn_BT, pos_BL):  # the merged model's logits, noting how far they are from the unmerged
        z_u = forgetting.model_scorer(unmerged)(ids_BT, attn_BT, pos_BL)
        z_m = forgetting.model_scorer(merged)(ids_BT, attn_BT, pos_BL)

        def logits(sl):
            nonlocal worst
            a, b = z_u(sl), z_m(sl)
            worst = max(worst, float((a - b).abs().max()))
            return b
        return logits

    per = forgetting.drift_per_prompt(forgetting.model_scorer(base), merged_scorer, tok,
                                      end_of_turn_id(tok, base.generation_config), prompts, answers_, nll=False)
    merged_drift = forgetting.token_mean(per, "kl")
    assert 0 < worst < 1e-5  # the merge rounds, it changes nothing else
    eps = torch.finfo(torch.float32).eps
    bound = 2 * worst * math.sqrt(2 * max(monitor, merged_drift)) + 2 * worst**2 + 2 * eps * math.log(len(tok))
    assert abs(merged_drift - monitor) <= bound, (merged_drift, monitor, worst, bound)
    assert bound < 0.02 * monitor  # a bound that still says something at this drift (4e-4)


def test_the_monitor_changes_no_metric_of_a_run_without_a_budget(tmp_path, tiny_model_dir):
    """With the monitor on (its defaults, and measuring every step) CE, KL, lambda, the gradient norm and
    the held-out loss are exactly those of the same run without it: it draws no random number (RAFT's
    rollouts are sampled), runs no training-mode forward and changes no weight."""
    keys = ("ce", "kl", "lambda", "grad_norm", "eval_domain_loss")
    for extra in ({"method": "sft"}, {"method": "raft", "lora": True, "lora_dropout": 0.1}):
        off = train(cfg(tmp_path, tiny_model_dir, max_steps=3, monitor_every=0, name=f"off-{extra['method']}", **extra),
                    progress=False)
        for on_settings in ({}, {"monitor_every": 1, **SMALL}):
            on = train(cfg(tmp_path, tiny_model_dir, max_steps=3, name=f"on-{extra['method']}-{len(on_settings)}",
                           **on_settings, **extra), progress=False)
            assert "drift_kl" in metrics(on)[0] and not any("drift_kl" in r for r in metrics(off))
            for k in keys:
                assert by_step(on, k) == by_step(off, k), k
            a, b = load_file(str(off / "model" / "model.safetensors")), load_file(str(on / "model" / "model.safetensors"))
            assert all(torch.equal(a[n], b[n]) for n in a)


def test_answers_are_made_once_and_reused_by_the_next_run_of_the_same_original(tmp_path, tiny_model_dir, monkeypatch):
    real, calls = forgetting.Forgetting._generate, []
    monkeypatch.setattr(forgetting.Forgetting, "_generate", lambda self, p: calls.append(len(p)) or real(self, p))
    monkeypatch.setenv("RAFTUNE_CACHE", str(tmp_path / "cache"))
    first = train(cfg(tmp_path, tiny_model_dir, method="sft", name="first", **SMALL), progress=False)
    second = train(cfg(tmp_path, tiny_model_dir, method="raft", lora=True, name="second", **SMALL), progress=False)
    assert calls == [8]  # the frozen copy's and the LoRA base's answers are the same model's: made once
    assert answers(first) == answers(second)
    made_by = json.loads((second / "monitor_answers.json").read_text())["made_by"]
    assert made_by["original"] == "base model, LoRA adapters off" and made_by["max_new_tokens"] == 16


def test_the_monitor_is_plotted_and_shown_with_its_budget(tmp_path, tiny_model_dir):
    from raftune.plots import plot_training

    run = train(cfg(tmp_path, tiny_model_dir, method="sft", forgetting_budget=0.5, monitor_every=1, **SMALL), progress=False)
    assert plot_training(run / "metrics.jsonl", run, budget=0.5) == run / "training_curves.png"
    rows = [r for r in metrics(run) if "lr" in r]
    assert all({"drift_kl", "anchor_kl", "anchor_weight", "monitor_s"} <= set(r) for r in rows)


# --- settings and bad input ------------------------------------------------------------------------------

def test_overlapping_anchor_and_monitor_prompts_are_refused(tmp_path, tiny_model_dir):
    same = tmp_path / "prompts.jsonl"
    same.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in ("Say hi.", "Name a colour.")))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"instruction": "name  a COLOUR."}) + "\n")
    with pytest.raises(ValueError, match=r"anchor_data .*other.jsonl and monitor_data .*prompts.jsonl share 1 prompt"):
        train(cfg(tmp_path, tiny_model_dir, method="sft", monitor_data=str(same), anchor_data=str(other), anchor_weight=1.0),
              progress=False)
    with pytest.raises(ValueError, match="forgetting_budget needs the monitor"):
        cfg(tmp_path, tiny_model_dir, forgetting_budget=0.1, monitor_every=0)
    assert cfg(tmp_path, tiny_model_dir).monitor_interval == train_module.MONITOR_EVERY
    assert cfg(tmp_path, tiny_model_dir, forgetting_budget=0.1).monitor_interval == train_module.MONITOR_EVERY_BUDGET


def test_the_built_in_prompt_sets_are_disjoint_and_readable():
    monitor = forgetting.load_general_prompts(forgetting.builtin_prompts("monitor"))
    anchor = forgetting.load_general_prompts(forgetting.builtin_prompts("anchor"))
    assert len(monitor) == len(anchor) == 48
    forgetting.disjoint(monitor, anchor, "monitor", "anchor")  # raises on overlap
    with pytest.raises(ValueError, match="share 1 prompt"):
        forgetting.disjoint(monitor, anchor + [monitor[5].upper()], "m", "a")


# --- the anchor and the budget ---------------------------------------------------------------------------

def test_the_anchor_weight_moves_drift(tmp_path, tiny_model_dir):
    """The lever: at a fixed anchor weight, more weight, less drift on the (disjoint) monitor prompts.
    (Under AdamW a weight far beyond these only changes the direction of steps of a fixed size, and the
    drift stops falling at a floor set by the learning rate: benchmarks/forgetting_budget.py.)"""
    drift = {}
    for mu in (0.0, 1.0, 10.0):
        run = train(cfg(tmp_path, tiny_model_dir, method="sft", lr=1e-2, max_steps=4, anchor_weight=mu, anchor_batch=4,
                        name=f"mu-{mu}", **SMALL), progress=False)
        drift[mu] = by_step(run, "drift_kl")[4]
        assert ("anchor_kl" in metrics(run)[1]) == (mu > 0)
    assert drift[0.0] > drift[1.0] > drift[10.0], drift


def test_a_budget_out_of_reach_is_said_and_the_final_model_saved(tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.WARNING)
    run = train(cfg(tmp_path, tiny_model_dir, method="sft", lr=1e-2, max_steps=3, forgetting_budget=1e-9, monitor_every=1,
                    anchor_weight_bounds=(1e-6, 1e-6), **SMALL), progress=False)
    budget = json.loads((run / "config.json").read_text())["budget"]
    assert budget["met"] is False and budget["step"] == 3 and "not met" in budget["why"]
    assert "forgetting budget not met" in caplog.text
    final = load_file(str(run / "checkpoint-3" / "trainable.safetensors"))
    saved = load_file(str(run / "model" / "model.safetensors"))
    shared = [n for n in final if n.removeprefix("lm.") in saved]
    assert shared and all(torch.equal(saved[n.removeprefix("lm.")], final[n]) for n in shared)


def test_the_budget_saves_the_best_point_within_it(tmp_path, tiny_model_dir):
    """A budget between the drift after step 2 and after step 3: model/ holds step 2's weights (the best
    held-out loss within the budget), kept aside though later checkpoints rotated, and config.json says so."""
    common = dict(method="sft", lr=1e-2, max_steps=4, monitor_every=1, anchor_weight_bounds=(1e-6, 1e-6),
                  save_every=1, keep_checkpoints=1, **SMALL)
    free = train(cfg(tmp_path, tiny_model_dir, name="free", anchor_weight=1e-6, **common), progress=False)
    d = by_step(free, "drift_kl")
    assert d[1] < d[2] < d[3] < d[4]
    run = train(cfg(tmp_path, tiny_model_dir, name="budget", forgetting_budget=(d[2] + d[3]) / 2, **common), progress=False)
    budget = json.loads((run / "config.json").read_text())["budget"]
    assert budget["met"] and budget["step"] == 2 and budget["within_budget"] == 2
    assert "step 2: the lowest held-out domain loss of the 2 measured point(s) within the budget" in budget["why"]
    assert not (run / "checkpoint-2").exists()  # rotated out: the kept copy is what model/ came from
    kept = load_file(str(run / "budget-best" / "trainable.safetensors"))
    saved = load_file(str(run / "model" / "model.safetensors"))
    shared = [n for n in kept if n.removeprefix("lm.") in saved]
    assert shared and all(torch.equal(saved[n.removeprefix("lm.")], kept[n]) for n in shared)
    final = load_file(str(run / "checkpoint-4" / "trainable.safetensors"))
    assert any(not torch.equal(final[n], kept[n]) for n in kept)


def test_a_budget_run_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    """Stopped after step 3 (the SIGTERM path) and run again: the controller's mu, the drift, the anchor and
    the weights are those of the uninterrupted run, and so is the budget's choice."""
    common = dict(method="raft", lora=True, lr=1e-2, max_steps=6, monitor_every=2, forgetting_budget=1e-4,
                  save_every=3, **SMALL)
    straight = train(cfg(tmp_path, tiny_model_dir, name="straight", **common), progress=False)
    real, calls = train_module._agreed_stop, {"n": 0}

    def stop_after_three(acc, signum):
        calls["n"] += 1
        return calls["n"] > 3 or real(acc, signum)

    monkeypatch.setattr(train_module, "_agreed_stop", stop_after_three)
    with pytest.raises(SystemExit):
        train(cfg(tmp_path, tiny_model_dir, name="resumed", **common), progress=False)
    monkeypatch.setattr(train_module, "_agreed_stop", real)
    resumed = train(cfg(tmp_path, tiny_model_dir, name="resumed", **common), progress=False)
    for key in ("drift_kl", "anchor_weight", "anchor_kl", "ce", "kl"):
        assert by_step(resumed, key) == by_step(straight, key), key
    assert len(set(by_step(straight, "anchor_weight").values())) > 1  # the controller moved mu
    budget = [json.loads((r / "config.json").read_text())["budget"] for r in (straight, resumed)]
    assert budget[0] == budget[1]
    a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(resumed / "model" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_the_controllers_derivative_is_in_the_run_key_only_with_a_budget(tmp_path, tiny_model_dir):
    """budget_derivative changes nothing without a budget: runs of other settings keep their folders (and
    are reused); with a budget it is another run."""
    def folder(**kw) -> str:
        return train(cfg(tmp_path, tiny_model_dir, method="sft", max_steps=1, **kw), progress=False).name

    assert folder(monitor_every=0) == folder(monitor_every=0, budget_derivative=0.0)
    budget = dict(forgetting_budget=0.5, monitor_every=1, **SMALL)
    assert folder(**budget) != folder(**budget, budget_derivative=0.0)
