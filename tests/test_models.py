import json
import os

import pytest
import torch

from raftune.models import (
    ModelLoadError,
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
    ("/nonexistent/model", "no such model folder"),
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
