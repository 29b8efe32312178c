#!/usr/bin/env bash
# One-command GPU validation for a CUDA machine WITHOUT a package registry (H100 / H200, torch + triton
# + nvcc preinstalled). Stages, each with its own timeout, all logs into one folder:
#   1. pip install -e . --no-deps --no-build-isolation   (builds the CUDA extension when nvcc exists)
#      + peers from ./.whl/*.whl if that folder exists (pip install --no-index --no-deps)
#   2. the full pytest suite on CUDA                      -> pytest.log
#   3. python -m fusedrl (fused vs eager, headline shape) -> fusedrl_main.log
#   4. python -m bench --preset headline                  -> bench/results.{md,json}, plot.png, bench.log
#      (N=8192, H=4096, V=151936, bf16, random + peaked regimes, every provider present)
# Worst case about 9 minutes (the stage timeouts add up to 540 s); override with T_INSTALL, T_TESTS,
# T_MAIN, T_BENCH (seconds); PYTEST_ARGS adds pytest options (e.g. '-n 8' with pytest-xdist). SKIP_INSTALL=1 / SKIP_TESTS=1 / SKIP_MAIN=1 / SKIP_BENCH=1 skip a stage.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # default: $OUT, else bench/results/gpu-<date>
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT_DIR=${1:-${OUT:-$ROOT/bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
T_INSTALL=${T_INSTALL:-150}
T_TESTS=${T_TESTS:-130}
T_MAIN=${T_MAIN:-60}
T_BENCH=${T_BENCH:-200}
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
T0=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }
stage() {  # stage NAME TIMEOUT LOG cmd...
  local name=$1 limit=$2 log=$3; shift 3
  local s rc
  s=$(date +%s)
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$SUMMARY"
  timeout --kill-after=10 "$limit" "$@" > >(tee "$log") 2>&1
  rc=$?
  [ "$rc" = 124 ] && note "    $name: TIMED OUT after ${limit}s"
  note "    $name: exit $rc in $(( $(date +%s) - s ))s (log: $(basename "$log"))"
  return 0
}

note "fusedrl GPU check: $(date -u +%FT%TZ) in $ROOT (commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
{
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  echo
  $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2
  $PY -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|liger|cut.cross|verl|pybind11|ninja|cmake|pytest|matplotlib|tqdm) " || true
} > "$OUT_DIR/env.txt" 2>&1
head -25 "$OUT_DIR/env.txt"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  stage install "$T_INSTALL" "$OUT_DIR/install.log" \
    bash -c "set -o pipefail; $PY -m pip install -e . --no-deps --no-build-isolation -v 2>&1 | tail -60
             if ls .whl/*.whl >/dev/null 2>&1; then
               echo '--- peers from .whl/'; $PY -m pip install --no-index --no-deps .whl/*.whl 2>&1 | tail -5
             else echo '(no .whl/ folder: peers only if already installed)'; fi"
fi
$PY -c "import fusedrl, torch; print('fusedrl backends on cuda:', fusedrl.available_backends('cuda'))" 2>&1 | tee -a "$SUMMARY"
$PY - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
from fusedrl.backends import availability
for b in ("torch", "triton", "cuda"):
    print(f"  backend {b}: {availability(b, torch.device('cuda'))}")
EOF

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stage pytest "$T_TESTS" "$OUT_DIR/pytest.log" $PY -m pytest tests -q -ra --durations=25 ${PYTEST_ARGS:-}
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT_DIR/pytest.log" | tail -25 >> "$SUMMARY"
fi

if [ "${SKIP_MAIN:-0}" != 1 ]; then
  stage "python -m fusedrl" "$T_MAIN" "$OUT_DIR/fusedrl_main.log" $PY -m fusedrl --device cuda --repeats 5 --warmup 2
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # the bench stops starting providers 25 s before its stage timeout so results.{md,json} stay complete
  stage bench "$T_BENCH" "$OUT_DIR/bench.log" \
    $PY -m bench --preset headline --device cuda --repeats 5 --warmup 2 --max-seconds 4 \
        --budget-seconds $(( T_BENCH - 25 )) --out "$OUT_DIR/bench"
  if [ -f "$OUT_DIR/bench/results.md" ]; then
    grep -E "^## |^\| (GEMM|fusedrl|eager|compile|liger|verl|cce)" "$OUT_DIR/bench/results.md" >> "$SUMMARY" || true
  fi
fi

note "total $(( $(date +%s) - T0 ))s; everything is in $OUT_DIR"
