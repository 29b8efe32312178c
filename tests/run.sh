#!/usr/bin/env bash
# The README's test command (CI runs exactly this through .ci/run).
# Installs what it needs, builds the package (and, where nvcc exists, the CUDA extension for sm_80 and
# sm_90a), checks lint and formatting, then runs the suite in two lanes: the fast lane, then the
# ahead-of-time compile gate (pytest marker "aot"). Without a GPU the triton kernels run in the
# interpreter and GPU-only tests are skipped. Extra arguments go to pytest (both lanes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A bare `torch` requirement would download a multi-GB CUDA build: take the pinned CPU wheel first
# when no torch is installed (GPU machines already have theirs).
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q pybind11 ninja
$PY -m pip install -q --no-build-isolation -e ".[test]"
# verl 0.9.1 for the verl parity tests: its wheel without the training stack, plus the few packages
# its loss modules (core_algos, rollout_corr_helper) import; pip's note about verl's other requirements
# (vllm, wandb, its transformers range, ...) is expected
$PY -m pip install -q --no-deps verl==0.9.1
$PY -m pip install -q "ray>=2.41" "tensordict==0.10.0" omegaconf codetiming orjson packaging 2>&1 \
    | grep -v "^verl 0.9.1 requires" || true
$PY -m ruff check .
$PY -m ruff format --check .
$PY -m pytest tests -q -ra -m "not aot" "$@"
# the AOT gate's own lane (nothing selected, e.g. for a path argument, is not a failure)
$PY -m pytest tests -q -ra -m aot "$@" || [ $? -eq 5 ]
