#!/usr/bin/env bash
# Optional GPU check: compute-sanitizer (memcheck, racecheck) and Nsight Compute (ncu) on one small case
# per backend (`python -m bench.sweep --one BACKEND`: forward + backward with a -inf bias column, T=0.7,
# random upstream grads, the filtered backward, then fused_policy_loss; exit 1 on a non-finite output).
# Everything goes to ONE text file (few files to copy off a remote machine). Guide: docs/gpu-validation.md.
#
#   bash bench/gpu_profile.sh            # standalone (builds fusedrl first unless SKIP_BUILD=1)
#   PROFILE=1 bash bench/gpu_check.sh    # as the last stage of the main check (SKIP_BUILD=1, T_PROFILE=70)
#   DRY=1 bash bench/gpu_profile.sh      # CPU: runs the small case without the tools, prints the commands
#
# Steps in priority order, each capped at T_TOOL s (default 60), all within T_PROFILE s (default 150):
#   memcheck cuda, memcheck triton, racecheck cuda, racecheck triton, ncu triton, ncu cuda.
# TOOLS=memcheck,racecheck,ncu and BACKENDS=cuda,triton choose a subset. Output: PROFILE_OUT, else
# $OUT/profile.txt, else bench/results/gpu-<UTC date>/profile.txt (DRY: .out/). The memory checker runs
# with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so every tensor is its own allocation (an out-of-bounds access
# inside a cached block would go unseen). ncu never touches clocks (--clock-control none).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DRY=${DRY:-0}
T_PROFILE=${T_PROFILE:-150}
T_TOOL=${T_TOOL:-60}
TOOLS=",${TOOLS:-memcheck,racecheck,ncu},"
BACKENDS=${BACKENDS:-cuda,triton}
ONE_ARGS=${ONE_ARGS:-"--n 300 --h 136 --v 5003"}            # unaligned: every masked edge path runs
NCU_ARGS=${NCU_ARGS:-"--n 2048 --h 4096 --v 32768"}         # large enough for real tile shapes
KERNELS='fwd_kernel|merge_kernel|du_kernel|gemm_kernel|bwd_atomic|onepass|row_stats|dz_kernel|colsum|cast_kernel|vanilla_kernel|cov_kernel|nvjet|gemm|xmma'
T0=$(date +%s)
DEADLINE=$(( T0 + T_PROFILE ))
if [ "$DRY" = 1 ]; then DEF=$ROOT/.out/dry-profile-$(date -u +%Y%m%d-%H%M%S).txt; else DEF=$ROOT/bench/results/gpu-$(date -u +%Y%m%d)/profile.txt; fi
OUTF=${PROFILE_OUT:-${OUT:+$OUT/profile.txt}}
OUTF=${OUTF:-$DEF}
mkdir -p "$(dirname "$OUTF")"
: > "$OUTF"
has() { case "$TOOLS" in *",$1,"*) return 0;; *) return 1;; esac; }
say() { echo "$*" | tee -a "$OUTF"; }
RESULTS=()

# step NAME cmd...: run under min(T_TOOL, time left), full output into the file, one result line kept
step() {
  local name=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  local lim=$(( T_TOOL < left ? T_TOOL : left ))
  if [ "$lim" -lt 15 ]; then RESULTS+=("$name: SKIPPED (${left}s left of T_PROFILE=${T_PROFILE}s)"); return; fi
  say "===== [$(( $(date +%s) - T0 ))s] $name (limit ${lim}s): $*"
  local s=$(date +%s) log rc
  log=$(mktemp)
  timeout --kill-after=5 "$lim" "$@" > "$log" 2>&1
  rc=$?
  cat "$log" >> "$OUTF"
  local errs
  errs=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|all outputs finite|NON-FINITE|unavailable|==PROF==|No kernels were profiled" "$log" | tail -3 | tr '\n' ' ')
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && errs="TIMED OUT at ${lim}s; $errs"
  RESULTS+=("$name: exit $rc in $(( $(date +%s) - s ))s; $errs")
  rm -f "$log"
}

say "fusedrl GPU profile $( [ "$DRY" = 1 ] && echo '(DRY RUN: CPU, no tools)' ) $(date -u +%FT%TZ); output $OUTF"
if [ "$DRY" != 1 ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUTF"
  if [ "${SKIP_BUILD:-0}" != 1 ] && ! $PY -c "import fusedrl._C" 2>/dev/null; then
    CC=$($PY -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')")
    case "$CC" in 9*|10*|12*) ARCH="${CC}a";; *) ARCH="$CC";; esac
    export FUSEDRL_CUDA_ARCHS=${FUSEDRL_CUDA_ARCHS:-$ARCH}
    step "build" $PY -m pip install --no-index --no-deps --no-build-isolation -e .
  fi
fi

for b in ${BACKENDS//,/ }; do
  if [ "$DRY" = 1 ]; then
    has memcheck && say "DRY: would run: PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 42 --print-limit 30 $PY -m bench.sweep --one $b $ONE_ARGS"
    step "one $b (CPU, no tool)" $PY -m bench.sweep --one "$b" --device cpu --n 37 --h 24 --v 507
    continue
  fi
  has memcheck && step "memcheck $b" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
      --leak-check no --error-exitcode 42 --print-limit 30 $PY -m bench.sweep --one "$b" $ONE_ARGS
done
if [ "$DRY" != 1 ]; then
  for b in ${BACKENDS//,/ }; do   # shared-memory hazards: our CUDA epilogues and Triton's tiles
    has racecheck && step "racecheck $b" compute-sanitizer --tool racecheck --error-exitcode 42 --print-limit 30 \
        $PY -m bench.sweep --one "$b" $ONE_ARGS
  done
  for b in triton cuda; do
    case ",$BACKENDS," in *",$b,"*) ;; *) continue;; esac
    has ncu && step "ncu $b" ncu --clock-control none --target-processes all -k "regex:$KERNELS" -c 40 \
        --section SpeedOfLight --section LaunchStats --section Occupancy $PY -m bench.sweep --one "$b" $NCU_ARGS
  done
else
  has racecheck && say "DRY: would run: compute-sanitizer --tool racecheck --error-exitcode 42 $PY -m bench.sweep --one BACKEND $ONE_ARGS"
  has ncu && say "DRY: would run: ncu --clock-control none --target-processes all -k 'regex:...' -c 40 --section SpeedOfLight --section LaunchStats --section Occupancy $PY -m bench.sweep --one BACKEND $NCU_ARGS"
fi

{
  echo
  echo "--- profile results (full tool output above)"
  for r in "${RESULTS[@]}"; do echo "$r"; done
  echo "total $(( $(date +%s) - T0 ))s of T_PROFILE=${T_PROFILE}s; file $OUTF"
} | tee -a "$OUTF"
