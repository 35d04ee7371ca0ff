"""Post-hoc baselines: FAPM and WiSE-FT as tensor functions, on tiny model folders, and on the command line."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from raftune.cli import app
from raftune.posthoc import fapm, fapm_scores, fapm_tensor, wise, wise_tensor

INF = math.inf


# --- tensor functions -----------------------------------------------------------------------------------

def test_fapm_by_hand_on_a_3x3_with_a_zero_weight():
    w0 = torch.tensor([[1.0, -2.0, 0.0], [0.5, 1.5, -1.0], [2.0, -0.5, 0.5]])  # mean |W_0| = 9 / 9 = 1
    dw = torch.tensor([[0.5, 1.0, 0.25], [-0.5, 0.75, 0.0], [-0.25, 1.0, 0.5]])
    w_ft = w0 + dw  # all values exact in binary
    # S = |dW| * (1 - 1 / |W_0|): factors 0, 1/2, -inf / -1, 1/3, 0 / 1/2, -1, -1
    s = torch.tensor([[0.0, 0.5, -INF], [-0.5, 0.25, 0.0], [0.125, -1.0, -0.5]])
    assert torch.allclose(fapm_scores(w0, w_ft), s)
    # keep 1/3: ceil(9/3) = 3 entries, the scores 0.5, 0.25, 0.125 (the next ones, 0 and 0, are not a tie at the cut)
    mask = torch.tensor([[False, True, False], [False, True, False], [True, False, False]])
    w = torch.tensor([[1.0, -1.0, 0.0], [0.5, 2.25, -1.0], [1.75, -0.5, 0.5]])
    got_w, got_mask = fapm_tensor(w0, w_ft, keep=1 / 3)
    assert torch.equal(got_mask, mask) and torch.equal(got_w, w)
    # the smallest keep still keeps one entry: the best one
    got_w, got_mask = fapm_tensor(w0, w_ft, keep=1e-9)
    assert got_mask.sum() == 1 and got_mask[0, 1]
    assert torch.equal(got_w, torch.where(got_mask, w_ft, w0))


def test_fapm_limits_and_no_nan():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 24, generator=gen)
    w_ft = w0 + 0.1 * torch.randn(16, 24, generator=gen)
    w, mask = fapm_tensor(w0, w_ft, keep=1.0)
    assert torch.equal(w, w_ft) and mask.all()
    w, mask = fapm_tensor(w0, w_ft, keep=1e-6)  # one entry of 384, the highest score
    best = fapm_scores(w0, w_ft).argmax()
    assert mask.sum() == 1 and mask.reshape(-1)[best]
    assert torch.equal(w.reshape(-1)[best], w_ft.reshape(-1)[best]) and torch.equal(w[~mask], w0[~mask])
    # zeros in W_0 and in dW, also at the same places: scores are finite or -inf, never NaN
    w0[::2, ::3] = 0.0
    w_ft[::4] = w0[::4]
    s = fapm_scores(w0, w_ft)
    assert not s.isnan().any() and (s[::2, ::3] == -INF).all() and s.isfinite()[w0 != 0].all()
    for keep in (1e-6, 0.1, 0.5, 1.0):
        w, mask = fapm_tensor(w0, w_ft, keep)
        assert w.isfinite().all() and mask.sum() == math.ceil(keep * w0.numel())
    # dW = 0 everywhere: W_0 back and nothing kept; a keep outside (0, 1] is refused
    w, mask = fapm_tensor(w0, w0.clone(), keep=0.5)
    assert torch.equal(w, w0) and not mask.any()
    with pytest.raises(ValueError, match="keep"):
        fapm_tensor(w0, w_ft, keep=0.0)


def test_wise_endpoints_are_exact():
    gen = torch.Generator().manual_seed(1)
    w0, w_ft = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    assert torch.equal(wise_tensor(w0, w_ft, 0.0), w0)
    assert torch.equal(wise_tensor(w0, w_ft, 1.0), w_ft)
    assert torch.equal(wise_tensor(w0, w_ft, 0.5), (w0 + w_ft) / 2)
    with pytest.raises(ValueError, match="alpha"):
        wise_tensor(w0, w_ft, 1.5)


# --- model folders ----------------------------------------------------------------------------------------

def load(folder) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def meta(folder: Path) -> dict:
    return json.loads((folder / "raftune.json").read_text())


@pytest.fixture(scope="module")
def tuned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with every weight moved a little, saved as a full model (tokenizer included)."""
    from transformers import AutoTokenizer

    model = load(tiny_model_dir)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():  # the tied embedding once: it stays tied
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("tuned")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on every linear layer of the tiny model, with nonzero B so that it changes the weights."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)  # no tokenizer: the base's is saved with the results
    return out


def check_tied(model) -> None:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fapm_and_wise_on_model_folders(tiny_model_dir, tuned_dir, tmp_path):
    w0, w_ft = params(load(tiny_model_dir)), params(load(tuned_dir))
    out = fapm(str(tiny_model_dir), str(tuned_dir), str(tmp_path / "fapm"), keep=0.25)
    assert out == tmp_path / "fapm"
    model = load(out)
    check_tied(model)
    got = params(model)
    assert got.keys() == w0.keys()
    kept = sum(int(fapm_tensor(w0[n], w_ft[n], 0.25)[1].sum()) for n in w0)
    for n in w0:
        assert torch.equal(got[n], fapm_tensor(w0[n], w_ft[n], 0.25)[0]), n
    m = meta(out)
    assert {k: m[k] for k in ("method", "base_model", "tuned_model", "tuned_lora", "keep")} == {
        "method": "fapm", "base_model": str(tiny_model_dir), "tuned_model": str(tuned_dir), "tuned_lora": False, "keep": 0.25}
    assert m["kept_fraction"] == pytest.approx(kept / sum(t.numel() for t in w0.values()))
    assert 0.25 <= m["kept_fraction"] < 0.26  # ceil per tensor adds at most one entry each

    outs = wise(str(tiny_model_dir), str(tuned_dir), str(tmp_path / "wise"), [0.0, 0.5, 1.0])
    assert outs == [tmp_path / "wise" / f"wise-{a}" for a in ("0", "0.5", "1")]
    for a, folder, want in zip((0.0, 0.5, 1.0), outs, (w0, None, w_ft)):
        model = load(folder)
        check_tied(model)
        for n, t in params(model).items():
            assert torch.equal(t, want[n] if want else wise_tensor(w0[n], w_ft[n], a)), (a, n)
        assert meta(folder)["method"] == "wise" and meta(folder)["alpha"] == a and "kept_fraction" not in meta(folder)
    assert sorted(p.name for p in (tmp_path / "wise").iterdir()) == ["wise-0", "wise-0.5", "wise-1"]  # no temp folders

    # a second run replaces the folder whole
    fapm(str(tiny_model_dir), str(tuned_dir), str(tmp_path / "fapm"), keep=1.0)
    assert meta(out)["keep"] == 1.0 and all(torch.equal(t, w_ft[n]) for n, t in params(load(out)).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fapm", "wise"]


def test_a_lora_adapter_is_merged_onto_the_base(tiny_model_dir, adapter_dir, tmp_path):
    from peft import PeftModel

    base_model = load(tiny_model_dir)
    w0 = params(base_model)
    merged = params(PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).merge_and_unload())
    assert any(not torch.equal(w0[n], merged[n]) for n in w0)
    out = fapm(str(tiny_model_dir), str(adapter_dir), str(tmp_path / "fapm"), keep=0.5)
    got = params(load(out))
    assert not any("lora" in n for n in got)
    for n in w0:
        assert torch.allclose(got[n], fapm_tensor(w0[n], merged[n], 0.5)[0], atol=1e-6), n
    assert meta(out)["tuned_lora"] is True and (out / "tokenizer_config.json").exists()
    (one,) = wise(str(tiny_model_dir), str(adapter_dir), str(tmp_path / "wise"), [1.0])
    assert all(torch.allclose(t, merged[n], atol=1e-6) for n, t in params(load(one)).items())


def test_different_models_are_refused_naming_both(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(tiny_model_dir))
    cfg.intermediate_size = 48
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    with pytest.raises(ValueError, match=r"tiny-llama.*other.*shapes differ.*mlp"):
        fapm(str(tiny_model_dir), str(other), str(tmp_path / "out"))
    cfg.intermediate_size, cfg.tie_word_embeddings = 64, False
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    with pytest.raises(ValueError, match=r"only in tuned \['lm_head.weight'\]"):
        wise(str(tiny_model_dir), str(other), str(tmp_path / "out"), [0.5])
    with pytest.raises(ValueError, match="not-here: no such folder"):
        wise(str(tiny_model_dir), str(tmp_path / "not-here"), str(tmp_path / "out"), [0.5])
    assert not (tmp_path / "out").exists()


# --- command line -------------------------------------------------------------------------------------------

def test_cli_commands(tiny_model_dir, tuned_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["fapm", "--base", str(tiny_model_dir), "--tuned", str(tuned_dir),
                                 "--keep", "0.2", "--out", str(tmp_path / "fapm")])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "fapm") in result.stdout and meta(tmp_path / "fapm")["keep"] == 0.2
    result = runner.invoke(app, ["wise", "--base", str(tiny_model_dir), "--tuned", str(tuned_dir),
                                 "--alpha", "0.25", "--alpha", "0.5", "--out", str(tmp_path / "wise")])
    assert result.exit_code == 0, result.output
    for a in ("0.25", "0.5"):
        assert str(tmp_path / "wise" / f"wise-{a}") in result.stdout and meta(tmp_path / "wise" / f"wise-{a}")["alpha"] == float(a)
    missing = tmp_path / "runs" / "train-x" / "model"
    result = runner.invoke(app, ["fapm", "--base", str(tiny_model_dir), "--tuned", str(missing), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and f"{missing}: no such folder" in "".join(result.output.split("\n")), result.output
    assert not (tmp_path / "bad").exists()
