#!/usr/bin/env bash
# Installs llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) into the current Python env;
# tests/test_remote.py runs the remote backend against it.
#
#   bash scripts/install_llama_server.sh
#
# Building llama-cpp-python compiles llama.cpp (~8-10 min on 2 cores), so the wheel is built once into
# ${RAFTUNE_WHEEL_CACHE:-$HOME/.cache/raftune/wheels} and reused; a second run with it installed is a no-op.
set -euo pipefail

VERSION=0.3.36
PYTHON=${PYTHON:-python}
CACHE=${RAFTUNE_WHEEL_CACHE:-$HOME/.cache/raftune/wheels}

installed=$("$PYTHON" - <<PY 2>/dev/null || true
import importlib.metadata as md
import llama_cpp.server  # noqa: F401  (fails when the [server] extras are missing)
print(md.version("llama_cpp_python"))
PY
)
if [[ "$installed" == "$VERSION" ]]; then
    echo "llama-cpp-python[server]==$VERSION already installed"
    exit 0
fi

mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [[ -z "$wheel" ]]; then
    echo "building llama-cpp-python==$VERSION into $CACHE (compiles llama.cpp, takes minutes)"
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PYTHON" -m pip wheel --no-deps "llama-cpp-python==$VERSION" -w "$CACHE"
    wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi

# The wheel itself, plus the base and [server] dependencies from PyPI.
"$PYTHON" -m pip install "${wheel}[server]"
"$PYTHON" -c "import llama_cpp.server" && echo "installed llama-cpp-python[server]==$VERSION from $wheel"
