#!/usr/bin/env bash
# Installs llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) into the current Python env;
# tests/test_remote.py runs the remote backend against it.
#
#   bash scripts/install_llama_server.sh
#
# Building llama-cpp-python compiles llama.cpp (~8-10 min on 2 cores), so the wheel is built once into
# ${RAFTUNE_WHEEL_CACHE:-$HOME/.cache/raftune/wheels}/portable and reused; a second run with it installed
# is a no-op.
#
# The build is portable (AVX2, no -march=native): a native build on a CPU with AMX and AVX-512
# (seen 2026-11-25) segfaulted in its first decode of the embedded Q4_1 model, which took every
# server test down with it.
set -euo pipefail

VERSION=0.3.36
PYTHON=${PYTHON:-python}
CACHE=${RAFTUNE_WHEEL_CACHE:-$HOME/.cache/raftune/wheels}/portable
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
FLAGS="$FLAGS -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
MARKER=$("$PYTHON" -c "import sys; print(sys.prefix)")/.raftune-llama-portable

installed=$("$PYTHON" - <<PY 2>/dev/null || true
import importlib.metadata as md
import llama_cpp.server  # noqa: F401  (fails when the [server] extras are missing)
print(md.version("llama_cpp_python"))
PY
)
if [[ "$installed" == "$VERSION" && -f "$MARKER" ]]; then
    echo "llama-cpp-python[server]==$VERSION already installed"
    exit 0
fi

mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [[ -z "$wheel" ]]; then
    echo "building llama-cpp-python==$VERSION into $CACHE (compiles llama.cpp, takes minutes)"
    # --no-cache-dir: pip's own wheel cache may hold a native build of the same version
    CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PYTHON" -m pip wheel --no-cache-dir --no-deps "llama-cpp-python==$VERSION" -w "$CACHE"
    wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi

# The wheel itself, plus the base and [server] dependencies from PyPI.
"$PYTHON" -m pip install --force-reinstall --no-deps "$wheel"
"$PYTHON" -m pip install "${wheel}[server]"
touch "$MARKER"
"$PYTHON" -c "import llama_cpp.server" && echo "installed llama-cpp-python[server]==$VERSION from $wheel"
