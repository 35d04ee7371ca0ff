import json
import os

import pytest
import torch

from raftune.models import (
    ModelLoadError,
    check_model,
    load_model_and_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model_path,
)


def test_dtype_defaults_and_overrides():
    assert pick_dtype(torch.device("cuda")) == torch.bfloat16
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "int3")
    assert pick_device("cpu").type == "cpu"


def test_local_folder_loads_with_requested_dtype(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16 and tok.pad_token is not None


@pytest.mark.parametrize("spec, message", [
    ("/nonexistent/model", "no such folder"),
    ("./missing.gguf", "no such GGUF file"),
])
def test_missing_local_paths_are_named(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_model_path(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_unreachable_hub_id_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="pass a local model folder, a .gguf file, or 'default'"):
        load_model_and_tokenizer("someone/not-cached-model-xyz", device="cpu")


def test_default_is_a_cached_dequantized_folder():
    path = resolve_model_path("default")
    assert resolve_model_path("default") == path  # converted once, then reused
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert os.path.getsize(os.path.join(path, "model.safetensors")) > 100e6


# --- damaged local models: refused before anything reads them, naming the file and what is wrong

def _truncated_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy that stopped half way
    return dst


def test_damaged_model_folders_are_named_with_the_cause(tiny_model_dir, tmp_path):
    import shutil

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights)
    bad_config = tmp_path / "bad-config"
    shutil.copytree(tiny_model_dir, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "llama",')
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0" * 64)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    cases = [
        (no_weights, "no-weights: config.json but no weights (none of model.safetensors"),
        (_truncated_copy(tiny_model_dir, tmp_path / "cut"), "cut/model.safetensors: truncated or damaged"),
        (bad_config, "bad-config/config.json: not valid JSON (line 1, column 24"),
        (a_file, "weights.bin: a file, not a model folder or a .gguf file"),
        (not_gguf, "model.gguf: not a GGUF file"),
    ]
    for path, message in cases:
        with pytest.raises(ModelLoadError) as e:
            load_model_and_tokenizer(str(path), device="cpu")
        assert message in str(e.value), (path, str(e.value))
        with pytest.raises(ModelLoadError):
            check_model(str(path))  # the cheap check that every stage makes before its folder


def test_a_whole_model_and_a_lora_adapter_pass_the_check(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    assert check_model(str(tiny_model_dir)) == tiny_model_dir
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    assert check_model(str(tmp_path / "adapter")) == tmp_path / "adapter"
    assert check_model("someone/some-model") is None  # a hub id: nothing local to check


def test_a_loader_failure_is_a_model_load_error_naming_the_folder(tiny_model_dir, tmp_path):
    """Whatever the loader raises on a folder that looks whole (here: a config of an unknown model type)."""
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, odd)
    (odd / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ModelLoadError, match=r"odd: cannot load the model: \w+"):
        load_model_and_tokenizer(str(odd), device="cpu")
