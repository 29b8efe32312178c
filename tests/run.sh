#!/usr/bin/env bash
# The README's test command (CI runs exactly this through .ci/run).
# Installs what it needs, builds the package (and, where nvcc exists, the CUDA extension for
# sm_80 and sm_90a), then runs the whole suite. Without a GPU the triton kernels run in the
# interpreter and GPU-only tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A bare `torch` requirement would download a multi-GB CUDA build: take the pinned CPU wheel first
# when no torch is installed (GPU machines already have theirs).
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q pybind11 ninja
$PY -m pip install -q --no-build-isolation -e ".[test]"
exec $PY -m pytest tests -q -ra "$@"
