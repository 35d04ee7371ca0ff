"""The built-in demo domain: question-answer pairs about the Python standard library.

    raftune demo --out demo.jsonl        # write the pairs as JSONL (or: python -m raftune.demo demo.jsonl)
    raftune refine --data demo           # stages read them through ``data.load_qa("demo")``

The pairs are made from text every machine with Python already has: the docstrings of a fixed list of
standard-library modules. For each public function, class and public method of a public class that
has its own docstring, the question names the object ("What does `statistics.median_grouped` do?")
and the answer is the first paragraph of its docstring, whitespace-normalised, after the object's
signature ("`textwrap.dedent(text)`: Remove any common leading whitespace from every line in ...").

The content depends on the Python minor version (docstrings and signatures change between 3.11 and
3.12, about 1,600 pairs on 3.11); on one version the output is identical from run to run and from
machine to machine: the modules are ones whose text does not depend on the platform, everything is
walked in sorted order, and the only choice (the question template) is made by hashing the object's
name. A module missing from a stripped-down build is skipped.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

# Modules whose docstrings do not depend on the platform (no os, shutil, subprocess; hashlib depends
# on the OpenSSL build). Pure Python or C accelerators that ship with every CPython.
MODULES = sorted([
    "abc", "argparse", "array", "ast", "base64", "bdb", "binascii", "bisect", "calendar", "cmath",
    "cmd", "code", "codecs", "collections", "collections.abc", "colorsys", "configparser",
    "contextlib", "contextvars", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "dis", "doctest", "email.header", "email.headerregistry", "email.message", "email.utils",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "graphlib", "gzip", "heapq", "hmac", "html", "html.parser", "http.client",
    "http.cookiejar", "http.cookies", "imaplib", "inspect", "ipaddress", "itertools", "json",
    "keyword", "linecache", "logging", "mailbox", "math", "mimetypes", "numbers", "operator",
    "optparse", "pathlib", "pickle", "pickletools", "plistlib", "poplib", "pprint", "pstats",
    "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "shlex", "smtplib",
    "statistics", "string", "struct", "symtable", "tarfile", "textwrap", "threading", "timeit",
    "tokenize", "tomllib", "traceback", "tracemalloc", "types", "typing", "unicodedata",
    "unittest", "urllib.parse", "urllib.robotparser", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax.saxutils", "zipfile", "zlib", "zoneinfo",
])

MIN_CHARS, MAX_CHARS = 40, 700

FUNCTION_TEMPLATES = (
    "What does `{name}` do?",
    "In Python's standard library, what is the purpose of `{name}`?",
    "Explain what `{name}` is used for.",
    "What is `{name}` for in Python?",
)
CLASS_TEMPLATES = (
    "What is the `{name}` class in Python's standard library?",
    "In Python's standard library, what is the purpose of `{name}`?",
    "Explain what `{name}` is used for.",
)

# A first line like "log(x, [base=math.e])" or "S.find(sub) -> int": a signature, not a description.
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")
# "S.remove(value) -- remove first occurrence of value." (collections.abc): drop the signature part.
_SIGNATURE_PREFIX = re.compile(r"^\w\.\w+\([^)]*\)( -> [^-]*)? -- ")
_GENERIC_DOCS = {object.__doc__, type.__doc__}


def first_paragraph(doc: str | None) -> str | None:
    """The docstring's first paragraph on one line, without a leading signature line; None when
    there is nothing but a signature."""
    if not doc or doc in _GENERIC_DOCS:
        return None
    lines = inspect.cleandoc(doc).splitlines()
    if lines and _SIGNATURE_LINE.match(lines[0].strip()):
        lines = lines[1:]
    paragraph = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            break
    text = _SIGNATURE_PREFIX.sub("", " ".join(" ".join(paragraph).split()))
    if not text or _SIGNATURE_LINE.match(text) or text.startswith(">>>"):
        return None
    return text


def _signature(obj, drop_self: bool) -> str:
    """``(a, b=1)``, or "" when there is none or it would not be reproducible (a default whose repr
    holds a memory address)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    if drop_self:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    text = str(sig)
    return "" if " at 0x" in text else text


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        # No __all__: what the module defines itself (C accelerators report "_name" as __module__).
        own = {module.__name__, "_" + module.__name__.rpartition(".")[2]}
        names = [n for n, v in vars(module).items() if getattr(v, "__module__", None) in own]
    return sorted(n for n in set(names) if not n.startswith("_"))


def _is_routine(obj) -> bool:
    return inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethod(obj)


def _methods(cls) -> list[tuple[str, object, bool]]:
    """(name, object to take the signature of, whether the signature starts with self) for the public
    methods defined in the class itself, not inherited."""
    out = []
    for name, raw in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(raw, (classmethod, staticmethod)):
            out.append((name, getattr(cls, name), False))
        elif inspect.isfunction(raw) or (inspect.ismethoddescriptor(raw) and callable(raw)):
            # Plain functions and C method descriptors: the class attribute still takes self.
            is_c_classmethod = type(raw).__name__ == "classmethod_descriptor"
            out.append((name, getattr(cls, name), not is_c_classmethod))
    return out


def _doc_of(raw) -> str | None:
    if isinstance(raw, (classmethod, staticmethod)):
        raw = raw.__func__
    doc = getattr(raw, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _question(full_name: str, is_class: bool) -> str:
    templates = CLASS_TEMPLATES if is_class else FUNCTION_TEMPLATES
    pick = int(hashlib.sha256(full_name.encode("utf-8")).hexdigest(), 16) % len(templates)
    return templates[pick].format(name=full_name)


def walk_stdlib() -> list[dict]:
    """The pairs, from the modules as they are in this interpreter (see ``build_demo``)."""
    if sys.flags.optimize >= 2:
        raise RuntimeError("the demo domain is built from docstrings, which python -OO strips")
    records: list[dict] = []
    seen_docs: set[str] = set()  # one pair per text: random.randint is Random.randint, etc.

    def add(module: str, name: str, raw, sig: str, is_class: bool) -> None:
        doc = first_paragraph(_doc_of(raw))
        if doc is None or not MIN_CHARS <= len(doc) <= MAX_CHARS or doc in seen_docs:
            return
        seen_docs.add(doc)
        full = f"{module}.{name}"
        records.append({"question": _question(full, is_class), "answer": f"`{full}{sig}`: {doc}",
                        "id": full, "module": module, "name": name})

    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        classes = []
        for name in _public_names(module):
            obj = getattr(module, name, None)
            if getattr(obj, "__module__", None) == "builtins" or getattr(obj, "__name__", name) != name:
                continue  # typing.Text is str, array.ArrayType is array.array: skip the aliases
            if inspect.isclass(obj):
                add(module_name, name, obj, _signature(obj, drop_self=False), is_class=True)
                classes.append((name, obj))
            elif _is_routine(obj):
                add(module_name, name, obj, _signature(obj, drop_self=False), is_class=False)
        for class_name, cls in classes:
            for method_name, attr, drop_self in _methods(cls):
                add(module_name, f"{class_name}.{method_name}", vars(cls)[method_name],
                    _signature(attr, drop_self), is_class=False)
    return records


def build_demo() -> list[dict]:
    """The demo pairs, records {"question", "answer", "id", "module", "name"}; "id" is the dotted
    name ("pathlib.PurePath.with_suffix"), unique.

    The walk runs in a fresh interpreter (``python -I -S``, standard library only): libraries patch
    the standard library when imported (torch replaces ``inspect.getfile``, transformers adds methods
    to ``logging.Logger``), so walking this process would give a set that depends on what was
    imported before.
    """
    code = "import json, runpy, sys; json.dump(runpy.run_path(sys.argv[1])['walk_stdlib'](), sys.stdout)"
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, __file__],
                          capture_output=True, text=True, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"building the demo domain failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout)


def write_demo(path: str | Path) -> int:
    """Write the demo pairs to ``path`` as JSONL; returns how many."""
    # Imported here: the walk runs this file in an interpreter that has only the standard library.
    from raftune.files import atomic_write_jsonl

    records = build_demo()
    atomic_write_jsonl(path, records)
    return len(records)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m raftune.demo OUT.jsonl")
    print(f"{write_demo(sys.argv[1])} pairs written to {sys.argv[1]}")
