#!/usr/bin/env bash
# fusedrl GPU validation in ONE call of at most T_TOTAL seconds (default 400, under 7 minutes), for a GPU
# held briefly: stages in priority order. Every stage writes as it goes, so a cut-off still returns
# what ran. Full guide: docs/gpu-validation.md.
#
#   stage   cap (s)  writes (all flat in DEST: at most 8 files)
#   build     90     logs.txt      pip install -e . (CUDA extension for this GPU's arch only) + peers from .whl/
#   tests    120     pytest.log    pytest -m gpu over tests/ (70 s), then the backend files on CUDA (the rest)
#   sweep     90     sweep.json    python -m bench.sweep: every backend vs an fp64 oracle at N=8192 H=4096
#                                  V=151936 bf16, random / peaked / masked(-inf) cases, fwd+bwd, + fused loss
#   model     60     sweep.json    python -m bench.onepass_model --calibrate: the one-pass planner's choices and
#                    ["onepass_model"]  modeled vs measured time per stage (CUDA events around each GEMM and
#                                  epilogue), the constants that fit (stored in sweep.json: 8 files at most)
#   bench   rest     results.json, results.md, plot.png   python -m bench --preset headline --tasks core,loss
#   profile   70     profile.txt   only with PROFILE=1: bench/gpu_profile.sh (compute-sanitizer / ncu)
#   final     30     summary.txt   environment, stage results, sweep table, bench headline rows, auto choice
#
# DEST = $1, else $OUT (the device tool's return folder), else bench/results/gpu-<UTC date>.
#   bash bench/gpu_check.sh                 # on the GPU machine (the device tool: docs/gpu-validation.md)
#   DRY=1 bash bench/gpu_check.sh           # CPU dry run: tiny shapes, no install, GPU-only parts skipped
#   PREPARE=1 bash bench/gpu_check.sh       # HERE, before the call: peer wheels + commit stamp into .whl/
# Knobs: T_TOTAL T_BUILD T_TESTS T_TESTS_GPU T_SWEEP T_MODEL T_PROFILE (seconds); STAGES=build,tests,sweep,model,bench
# (a subset, e.g. for a second call); PROFILE=1; PYTEST_WORKERS (default 8 with pytest-xdist, 0 = off);
# PYTEST_ARGS, SWEEP_ARGS, BENCH_ARGS (extra options); BENCH_PROVIDERS (default '!fusedrl-torch,!fusedrl-grpo-torch-recompute,!fusedrl-klcov-torch,!fusedrl-clipcov-torch';
# empty = all); TEST_FILES (backend files run whole on CUDA);
# FUSEDRL_COMMIT (commit stamp when the tree has no .git; PREPARE=1 writes it to .whl/COMMIT).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DRY=${DRY:-0}

# ------------------------------------------------------------------------------------------ prepare
if [ "${PREPARE:-0}" = 1 ]; then   # runs HERE (registry access), not on the device
  mkdir -p .whl
  git check-ignore -q .whl/x.whl || echo "WARNING: .whl/ is not git-ignored: add /.whl/ to .gitignore"
  PEERS=${PEERS:-"liger-kernel cut-cross-entropy verl"}
  for p in $PEERS; do
    n=$(echo "$p" | tr - _)
    if ls .whl/"$n"-*.whl >/dev/null 2>&1; then echo "have $(ls .whl/"$n"-*.whl)"; continue; fi
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$p" || echo "could not download $p (it will be reported as a skipped provider)"
  done
  echo "$(git rev-parse HEAD 2>/dev/null || echo unknown) $(git describe --always --dirty 2>/dev/null || echo unknown)" > .whl/COMMIT
  echo "commit stamp: $(cat .whl/COMMIT)  (uncommitted edits travel too: '-dirty' says so)"
  du -ch .whl/* | tail -1
  echo 'now: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=430)'
  exit 0
fi

# ------------------------------------------------------------------------------------------ setup
T_TOTAL=${T_TOTAL:-400}
T_BUILD=${T_BUILD:-90}
T_TESTS=${T_TESTS:-120}
T_TESTS_GPU=${T_TESTS_GPU:-70}
T_SWEEP=${T_SWEEP:-90}
T_MODEL=${T_MODEL:-60}
T_PROFILE=${T_PROFILE:-70}
T_FINAL=${T_FINAL:-30}
STAGES=",${STAGES:-build,tests,sweep,model,bench},"
[ "${PROFILE:-0}" = 1 ] && STAGES="${STAGES}profile,"
T0=$(date +%s)
DEADLINE=$(( T0 + T_TOTAL ))
if [ "$DRY" = 1 ]; then DEFAULT_DEST=$ROOT/.out/dry-$(date -u +%Y%m%d-%H%M%S); else DEFAULT_DEST=$ROOT/bench/results/gpu-$(date -u +%Y%m%d); fi
DEST=${1:-${OUT:-$DEFAULT_DEST}}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
SUMMARY=$DEST/summary.txt
LOGS=$DEST/logs.txt
: > "$SUMMARY"
: > "$LOGS"

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE - $(date +%s) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }
want() { case "$STAGES" in *",$1,"*) return 0;; *) return 1;; esac; }

# stage NAME CAP LOG cmd...: runs cmd under `timeout min(CAP, time left - T_FINAL)`, output appended to LOG,
# one status line in the summary (and on stdout). Returns the command's exit status (99: skipped).
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local avail=$(( $(left) - T_FINAL ))
  local limit=$(( cap < avail ? cap : avail ))
  if [ "$limit" -lt 15 ]; then
    note "[$(elapsed)s] $name: SKIPPED (${avail}s left of T_TOTAL=${T_TOTAL}s)"
    return 99
  fi
  local s rc
  s=$(date +%s)
  echo "===== [$(elapsed)s] $name (limit ${limit}s): $*" | tee -a "$log"
  # output to the log only: stdout (the device tool's output_tail) is kept for the summary printed last
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local msg="exit $rc"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && msg="TIMED OUT at ${limit}s (exit $rc)"
  note "[$(elapsed)s] $name: $msg in $(( $(date +%s) - s ))s (log: $(basename "$log"))"
  return "$rc"
}

# commit stamp: git when the tree has .git, else FUSEDRL_COMMIT, else .whl/COMMIT (PREPARE=1 wrote it)
if git rev-parse HEAD >/dev/null 2>&1; then
  export FUSEDRL_COMMIT="$(git rev-parse HEAD) $(git describe --always --dirty)"
elif [ -z "${FUSEDRL_COMMIT:-}" ] && [ -f .whl/COMMIT ]; then
  export FUSEDRL_COMMIT="$(cat .whl/COMMIT)"
fi

note "fusedrl GPU check $( [ "$DRY" = 1 ] && echo '(DRY RUN: CPU, tiny shapes; no GPU figures)' )"
note "date $(date -u +%FT%TZ); commit ${FUSEDRL_COMMIT:-unknown}; stages ${STAGES//,/ }; T_TOTAL ${T_TOTAL}s; results in $DEST"
{
  echo "--- environment"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  $PY - <<'EOF' 2>&1
import sys, torch
cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if cap else None, "| capability", cap)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton not importable:", e)
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc: not found"
  command -v ncu >/dev/null && echo "ncu: $(command -v ncu)"; command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)"
  echo "peer wheels in .whl/: $(ls .whl/*.whl 2>/dev/null | xargs -n1 basename 2>/dev/null | tr '\n' ' ')"
} > "$DEST/.env.txt" 2>&1
cat "$DEST/.env.txt" | tee -a "$SUMMARY"
rm -f "$DEST/.env.txt"
CC=$($PY -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" 2>/dev/null || true)
if [ "$DRY" != 1 ] && [ -z "$CC" ]; then
  note "no CUDA device visible to torch: nothing to validate (use DRY=1 for a CPU dry run)"
  exit 2
fi

# ------------------------------------------------------------------------------------------ 1. build
if want build; then
  if [ "$DRY" = 1 ]; then
    stage build 60 "$LOGS" bash -c "echo 'DRY: would run: FUSEDRL_CUDA_ARCHS=<arch> $PY -m pip install --no-index --no-deps --no-build-isolation -e .'
      echo 'DRY: would install peers: $(ls .whl/*.whl 2>/dev/null | tr '\n' ' ')'; $PY -c 'import fusedrl; print(\"fusedrl importable from\", fusedrl.__file__)'"
  else
    case "$CC" in 9*|10*|12*) ARCH="${CC}a";; *) ARCH="$CC";; esac   # wgmma / tcgen05 need the 'a' targets
    export FUSEDRL_CUDA_ARCHS=${FUSEDRL_CUDA_ARCHS:-$ARCH}          # one arch: half the compile time
    stage build "$T_BUILD" "$LOGS" bash -c "set -o pipefail
      echo \"FUSEDRL_CUDA_ARCHS=\$FUSEDRL_CUDA_ARCHS\"
      $PY -m pip install --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -30
      if ls .whl/*.whl >/dev/null 2>&1; then
        echo '--- peers from .whl/'; $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl 2>&1 | tail -5
      else echo '(no .whl/ wheels: peers only where already installed)'; fi"
  fi
fi
$PY - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, torch
import fusedrl
from fusedrl.backends import auto_choice, availability
from fusedrl.backends.cuda.extension import build_info
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("extension build:", json.dumps(build_info()))
for b in ("torch", "triton", "cuda"):
    print(f"  backend {b} on {dev}: {availability(b, dev)}")
a = auto_choice(dev)
print(f"  auto on {dev} -> {a['choice']} (order {a['order']}; {a['source']})")
EOF

# ------------------------------------------------------------------------------------------ 2. tests
if want tests; then
  # -v: one line per finished test, so a cut-off log still says what passed; -ra: the reasons at the end
  PT=(-v -ra --tb=short -p no:cacheprovider --durations=10)
  W=${PYTEST_WORKERS:-8}
  if [ "$DRY" != 1 ] && [ "$W" != 0 ] && $PY -c "import xdist" 2>/dev/null; then PT+=(-n "$W"); fi
  HAS_TIMEOUT=0
  if $PY -c "import pytest_timeout" 2>/dev/null; then PT+=(--timeout "${PYTEST_TIMEOUT:-90}"); HAS_TIMEOUT=1; fi
  HAS_SESSION=0   # pytest-timeout >= 2.3 ends the session cleanly (summary printed) before our hard limit
  if [ "$HAS_TIMEOUT" = 1 ] && $PY -m pytest --help 2>/dev/null | grep -q -- --session-timeout; then HAS_SESSION=1; fi
  sess() { [ "$HAS_SESSION" = 1 ] && echo "--session-timeout $(( $1 > 30 ? $1 - 12 : 18 ))"; }
  TEST_FILES=${TEST_FILES:-"tests/backends/test_triton_backend.py tests/backends/test_cuda_backend.py"}
  # a) every @pytest.mark.gpu test (never run in CI), b) the backend files whole: on CUDA their
  #    small-shape tests run on the GPU too (the -m gpu ones already ran in a)
  stage "tests: pytest -m gpu tests/" "$T_TESTS_GPU" "$DEST/pytest.log" \
      $PY -m pytest tests -m gpu "${PT[@]}" $(sess "$T_TESTS_GPU") ${PYTEST_ARGS:-}
  T_B=$(( T_TESTS - T_TESTS_GPU > 15 ? T_TESTS - T_TESTS_GPU : 15 ))
  if [ "$DRY" = 1 ]; then   # the interpreter would take minutes: prove the selection only
    stage "tests: backend files (collect only in DRY)" "$T_B" "$DEST/pytest.log" \
        $PY -m pytest $TEST_FILES -m "not gpu" --co -q -p no:cacheprovider
  else
    stage "tests: backend files on CUDA" "$T_B" "$DEST/pytest.log" \
        $PY -m pytest $TEST_FILES -m "not gpu" "${PT[@]}" $(sess "$T_B") ${PYTEST_ARGS:-}
  fi
  {
    echo "--- pytest (both parts; per-test lines in pytest.log)"
    for st in PASSED FAILED ERROR SKIPPED XFAIL XPASS; do
      c=$(grep -cE "^(\[gw[0-9]+\] \[ *[0-9]+%\] $st |tests/[^ ]*::[^ ]* $st)" "$DEST/pytest.log")
      [ "$c" != 0 ] && printf '%s %s  ' "$c" "$st"
    done
    echo "(counted from per-test lines)"
    grep -E "^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* =+$|tests? collected" "$DEST/pytest.log"
    grep -E "^(FAILED|ERROR) " "$DEST/pytest.log" | cut -c1-300 | head -40
  } >> "$SUMMARY"
fi

# ------------------------------------------------------------------------------------------ 3. sweep
if want sweep; then
  SW=(--out "$DEST/sweep.json")
  [ "$DRY" = 1 ] && SW+=(--dry)
  avail=$(( $(left) - T_FINAL )); lim=$(( T_SWEEP < avail ? T_SWEEP : avail ))
  # rows stop starting 20 s before the limit (one headline row takes seconds): sweep.json stays complete
  stage sweep "$T_SWEEP" "$LOGS" $PY -m bench.sweep "${SW[@]}" --budget-seconds $(( lim > 40 ? lim - 20 : 20 )) ${SWEEP_ARGS:-}
fi

# ------------------------------------------------------------------------------------------ 3b. model
if want model; then
  # the one-pass cost model against CUDA-event stage times: merged into sweep.json (a standalone
  # onepass_model.json only when the sweep did not run), so the returned files stay at most 8
  MA=(--calibrate --merge-into "$DEST/sweep.json" --key onepass_model)
  [ "$DRY" = 1 ] && MA+=(--dry)
  stage model "$T_MODEL" "$LOGS" $PY -m bench.onepass_model "${MA[@]}"
fi

# ------------------------------------------------------------------------------------------ 4. bench
if want bench; then
  reserve=$T_FINAL
  want profile && reserve=$(( reserve + T_PROFILE ))
  avail=$(( $(left) - reserve ))
  if [ "$DRY" = 1 ]; then
    BA=(--device cpu --n 256 --h 64 --v 1003 --dtype fp32 --regime both --tasks core,loss --repeats 2 --warmup 0
        --no-memory --providers '!compile,!compile-grpo')
  else
    BA=(--preset headline --tasks core,loss --device cuda --repeats 5 --warmup 2 --max-seconds 3)
    # the torch backend's recompute schedule on CUDA runs fp32 GEMMs (~2.5 s a step at the headline shape):
    # the sweep checks its correctness; BENCH_PROVIDERS= (empty) benchmarks it too. Its one-pass loss
    # (fusedrl-grpo-torch: 16-bit cuBLAS GEMMs + torch-op epilogue) stays in.
    BP=${BENCH_PROVIDERS-'!fusedrl-torch,!fusedrl-grpo-torch-recompute,!fusedrl-klcov-torch,!fusedrl-clipcov-torch'}
    [ -n "$BP" ] && BA+=(--providers "$BP")
  fi
  # the bench stops starting providers 45 s before its limit, so its JSON/markdown stay complete
  stage bench "$avail" "$LOGS" $PY -m bench "${BA[@]}" --budget-seconds $(( avail > 90 ? avail - 45 : 45 )) \
      --out "$DEST" ${BENCH_ARGS:-}
fi

# ------------------------------------------------------------------------------------------ 5. profile
if want profile; then
  # two memchecks (cuda, triton) fit in 70 s at 35 s each; the rest is reported as skipped
  stage profile "$T_PROFILE" "$LOGS" env SKIP_BUILD=1 PROFILE_OUT="$DEST/profile.txt" T_PROFILE="$T_PROFILE" \
      T_TOOL="${T_TOOL:-35}" bash bench/gpu_profile.sh
fi

# ------------------------------------------------------------------------------------------ final
FINAL=$(mktemp)
{
  echo
  # one python process: sweep table, commit stamp + re-render of results.md/plot.png, bench headline rows,
  # measured auto entry (bench/sweep.py finalize)
  timeout $(( T_FINAL > 10 ? T_FINAL - 5 : 5 )) $PY -m bench.sweep --finalize "$DEST" 2>&1
  for f in "$DEST/sweep.json" "$DEST/onepass_model.json"; do
    [ -f "$f" ] && timeout 10 $PY -m bench.onepass_model --summary "$f" 2>&1
  done
  if [ -f "$DEST/profile.txt" ]; then echo; sed -n '/^--- profile results/,$p' "$DEST/profile.txt"; fi
  echo
  echo "--- stage results"
  grep -E "^\[[0-9]+s\] " "$SUMMARY"
  echo "total $(elapsed)s of T_TOTAL=${T_TOTAL}s"
  echo "--- files in $DEST"
  ls -la "$DEST" | tail -n +4
  nf=$(find "$DEST" -type f | wc -l)
  [ "$nf" -gt 8 ] && echo "WARNING: $nf files: the device tool returns at most 8"
} > "$FINAL" 2>&1
cat "$FINAL" >> "$SUMMARY"
rm -f "$FINAL"
rm -f "$DEST"/*.tmp
echo
echo "################ summary ($SUMMARY)"
cat "$SUMMARY"
