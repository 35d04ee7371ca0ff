"""Typed validation of every stage's settings, in one place.

Each stage's config (``RefineConfig``, ``TrainConfig``, ``EvalConfig``) is a frozen dataclass made by
``settings`` below: a pydantic dataclass, so every value is checked against its annotation when the
config is built (types, ranges, lists vs strings, finite numbers), before any folder is created or
model loaded, whether it came from YAML, a flag or ``--set``. Why pydantic: it is the field's
standard for typed settings (FastAPI, vLLM, LiteLLM), it checks and coerces what YAML gives (``1e-4``
is a string to YAML, a number to the setting) with one error per bad value and its location, and
its dataclasses stay plain dataclasses (``dataclasses.asdict``, ``replace``, ``fields`` keep working).

``build(cls, values, prefix)`` turns pydantic's errors into a ``SettingsError`` that names each
setting (``train.lr: must be > 0, got -1.0``); the CLI adds the file and line where it came from.

Every YAML raftune reads (stage and run configs, templates files, ``--set`` values) goes through
``read_yaml``/``parse_yaml`` below: ``yaml.safe_load``'s constructors (no ``!!python`` tags), with the
file's size, its nesting and its values (aliases expanded) capped, so that reading a file costs at
most what a config costs, however the file is written.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

# --- the decorator of every stage config

def settings(cls):
    """A frozen pydantic dataclass whose bad values raise ``SettingsError`` (a ValueError naming each setting)."""
    cls = _pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
    validate = cls.__init__

    @functools.wraps(validate)
    def __init__(self, *args, **kwargs):
        try:
            validate(self, *args, **kwargs)
        except ValidationError as e:
            own = [err.get("ctx", {}).get("error") for err in e.errors() if err["type"] == "value_error" and not err["loc"]]
            if own and isinstance(own[0], Exception):  # a check across settings (__post_init__): its own error
                raise own[0] from None
            raise SettingsError(_problems(cls, e)) from None

    cls.__init__ = __init__
    return cls

# --- value types that say what a setting accepts

Positive = Annotated[int, Field(ge=1)]  # counts: steps, batch sizes, tokens
NonNegative = Annotated[int, Field(ge=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


def _split_commas(value: Any) -> Any:
    """A comma-separated string is a list (``--suite domain,ifeval``); anything else goes on to the type check."""
    if isinstance(value, str):
        return tuple(s.strip() for s in value.split(",") if s.strip())
    return value


CommaList = Annotated[tuple[str, ...], BeforeValidator(_split_commas)]


def _check_device(value: str | None) -> str | None:
    if value is None or value == "auto":
        return value
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"not a device: {value!r} (use auto, cpu, cuda, cuda:1 or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{value!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{value!r}: MPS is not available on this machine")
    return value


Device = Annotated[str | None, AfterValidator(_check_device)]
DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


def _check_dtype(value: str | None) -> str | None:
    if value is not None and value not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}: use {', '.join(DTYPES)}")
    return value


Dtype = Annotated[str | None, AfterValidator(_check_dtype)]


# --- errors that name the setting

class SettingsError(ValueError):
    """Bad settings: ``problems`` is a list of (dotted setting or None, message)."""

    def __init__(self, problems: list[tuple[str | None, str]]):
        self.problems = problems
        super().__init__("; ".join(f"setting {k}: {m}" if k else m for k, m in problems))


def _describe(error: dict) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    value = error.get("input")
    shown = repr(value) if not isinstance(value, (dict, list, tuple)) or len(repr(value)) < 60 else type(value).__name__
    if kind == "unexpected_keyword_argument":
        return "unknown setting"
    if kind in ("missing", "missing_argument"):
        return "required, not given"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound}, got {shown}"
    if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
        return f"must be a finite number, got {shown}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in ("tuple_type", "list_type"):
        return f"expected a list, got {type(value).__name__} {shown}"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {type(value).__name__} {shown}"


def _problems(cls, e: ValidationError) -> list[tuple[str | None, str]]:
    problems = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        name = loc[0] if loc else None
        message = _describe(err)
        if err["type"] == "unexpected_keyword_argument" and name:
            close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(cls)], n=1)
            message += f" (did you mean {close[0]}?)" if close else f" of {cls.__name__}"
        problems.append((".".join(loc) if name else None, message))
    return problems


def build(cls, values: dict, prefix: str = "", keys_of: dict[str, str] | None = None):
    """``cls(**values)``; a bad value raises ``SettingsError`` naming ``prefix + setting``, or the dotted
    key that ``keys_of`` maps the setting to (where its value came from)."""
    keys_of = keys_of or {}
    try:
        return cls(**values)
    except SettingsError as e:
        located = []
        for key, message in e.problems:
            if key is not None:
                head, _, rest = key.partition(".")
                key = keys_of.get(head, prefix + head) + (f".{rest}" if rest else "")
            located.append((key, message))
        raise SettingsError(located) from None


# --- reading YAML, bounded whatever the file holds

MAX_YAML_BYTES = 1 << 20  # 1 MiB; raftune's configs and templates files are a few KB
MAX_YAML_DEPTH = 32  # a run config nests 4 deep
# Values, an alias counting as many as the value it names: a "billion laughs" file (nine levels of ten
# aliases) is refused at its first alias of a big value, never built nor walked
MAX_YAML_NODES = 20_000


class YamlError(ValueError):
    """A YAML file or value that raftune does not read; the message names it and says why."""


# libyaml's parser where PyYAML has it (its wheels do): 20-50 times faster than the pure-Python one
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_events(text: str, origin: str) -> None:
    """Refuse a document over the caps from its parse events, before anything composes or builds it: the
    composer recurses once per level, and what reads the result walks an alias once per use."""
    depth, nodes = 0, 0
    open_: list[tuple[str | None, int]] = []  # (anchor, values before it) of each collection being read
    sizes: dict[str, int] = {}  # anchor -> its value's values, aliases expanded
    for event in yaml.parse(text, Loader=_LOADER):
        problem = None
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_.pop()
            depth -= 1
            if anchor:
                sizes[anchor] = nodes - before
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_):
                problem = f"alias *{event.anchor} is inside the value it names"
            nodes += sizes.get(event.anchor, 0)  # an undefined one: the composer says so
        elif isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
            nodes += 1
            if isinstance(event, yaml.ScalarEvent) and event.anchor:
                sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                open_.append((event.anchor, nodes - 1))
        if depth > MAX_YAML_DEPTH:
            problem = f"nested over {MAX_YAML_DEPTH} levels deep"
        elif nodes > MAX_YAML_NODES:
            problem = f"over {MAX_YAML_NODES} values (aliases expanded)"
        if problem:
            raise YamlError(f"{origin}: line {event.start_mark.line + 1}: {problem}")


def _yaml_problem(e: yaml.YAMLError, located: bool) -> str:
    """One line: where and what (PyYAML's own text spans lines and repeats the name)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark and located else ""
        context = f" ({e.context})" if e.context else ""
        return f"{where}{e.problem}{context}"
    return " ".join(str(e).split())


def parse_yaml(text: str, origin: str, located: bool = True) -> tuple[Any, yaml.Node | None]:
    """(value, node) of one YAML document, as ``yaml.safe_load`` builds it, within the caps above; the
    node gives each key's line. A refusal is a ``YamlError`` naming ``origin`` (and the line and column
    where ``located``: not for a one-line value, where libyaml places the end of the text on line 2)."""
    try:
        _check_events(text, origin)
        loader = _LOADER(text)
        try:
            node = loader.get_single_node()
            return (loader.construct_document(node) if node is not None else None), node
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise YamlError(f"{origin}: not valid YAML: {_yaml_problem(e, located)}") from None


def read_yaml(path: str | Path, what: str = "YAML file") -> tuple[Any, yaml.Node | None]:
    """``parse_yaml`` of the file ``path`` (``what`` names it in errors: "config file"); the file is
    refused unread past ``MAX_YAML_BYTES``, and so is a folder or text that is not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise YamlError(f"{path}: is a folder, not a {what}")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)  # not stat: a pipe or a device has no size
    except FileNotFoundError:
        raise YamlError(f"{path}: no such {what}") from None
    except OSError as e:
        raise YamlError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > MAX_YAML_BYTES:
        raise YamlError(f"{path}: over {MAX_YAML_BYTES >> 20} MiB, too big for a {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise YamlError(f"{path}: not UTF-8 text (line {line}: byte 0x{data[e.start]:02x} at offset {e.start}); "
                        f"save the {what} as UTF-8") from None
    return parse_yaml(text, str(path))
