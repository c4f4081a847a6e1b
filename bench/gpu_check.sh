#!/usr/bin/env bash
# One prepared GPU check of ksl-ops: build the CUDA extension, run the CUDA tests (sync-debug mode
# included), compute-sanitizer memcheck and racecheck on small odd sizes, and the CUDA kernel bench,
# everything written under one results folder. Sized to finish in under 8 minutes on an H100/H200.
#
#   bash bench/gpu_check.sh                  # on a GPU machine, from the repository root
#   bash bench/gpu_check.sh --out DIR        # results folder (default bench/results/gpu-check-<host>-<date>)
#   bash bench/gpu_check.sh --check          # no GPU: verify that every step exists and parses (CI)
#
# It uses the python3 on PATH as it is (a CUDA torch, pytest, hypothesis; no network needed) and
# installs the package with `pip install --no-build-isolation --no-deps -e .`. A step whose tool is
# missing (compute-sanitizer, pytorch-metric-learning) is skipped and the summary says so. The exit
# status is non-zero if any step that ran failed.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=run
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --check) mode=check ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
# The CUDA tests: every test parametrised over the device (its id says cuda) and every CUDA-only one.
TEST_FILES=(tests/test_prob_consensus.py tests/test_embedding_consensus.py tests/test_branch_triplet.py
            tests/test_host_path.py tests/test_ksl_loss.py tests/test_amp.py)
TEST_SELECT="cuda"
SANITIZER_TOOLS=(memcheck racecheck)

if [ "$mode" = check ]; then
  # Everything the run would execute, checked without a GPU.
  set -e
  echo "gpu_check --check: bash syntax"
  bash -n "$0"
  echo "gpu_check --check: python sources compile"
  "$PY" -m py_compile setup.py bench/kernels.py bench/baselines.py bench/gpu_sanitize.py "${TEST_FILES[@]}"
  echo "gpu_check --check: the CUDA tests are collected (-k $TEST_SELECT)"
  n=$("$PY" -m pytest --collect-only -q -p no:cacheprovider "${TEST_FILES[@]}" -k "$TEST_SELECT" 2>&1 \
      | grep -cE '::' || true)
  if [ "$n" -lt 10 ]; then
    echo "gpu_check --check: only $n CUDA tests collected" >&2
    "$PY" -m pytest --collect-only -q "${TEST_FILES[@]}" -k "$TEST_SELECT" | tail -20 >&2
    exit 1
  fi
  echo "  $n tests"
  # Captured first: `pytest | grep -q` fails under pipefail when grep closes the pipe early.
  sync_tests=$("$PY" -m pytest --collect-only -q -p no:cacheprovider tests/test_host_path.py -k "no_host_sync")
  grep -q no_host_sync <<< "$sync_tests"
  echo "gpu_check --check: sanitizer cases and bench arguments parse"
  "$PY" bench/gpu_sanitize.py --list | tail -1
  "$PY" bench/gpu_sanitize.py --list --quick | tail -1
  "$PY" bench/kernels.py --help > /dev/null
  "$PY" -c "import bench.kernels as k; k._cases('all')"
  for tool in nvcc compute-sanitizer nvidia-smi; do
    if command -v "$tool" > /dev/null 2>&1; then echo "  $tool: found"; else echo "  $tool: not here (needed on the GPU machine)"; fi
  done
  echo "gpu_check --check: ok"
  exit 0
fi

start=$(date +%s)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
host=$(hostname | tr -c 'a-zA-Z0-9-\n' '-')
out=${out:-bench/results/gpu-check-$host-$stamp}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
failed=0
note() { echo "$*" | tee -a "$summary"; }
elapsed() { echo $(( $(date +%s) - start )); }
# step NAME TIMEOUT_S CMD...: runs CMD with its output in $out/NAME.log, records status and time.
step() {
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "=== [$(elapsed)s] $name: $*"
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then note "$name: ok (${took}s)"; else
    failed=1
    if [ $rc -eq 124 ]; then note "$name: TIMED OUT after ${limit}s"; else note "$name: FAILED rc=$rc (${took}s)"; fi
    tail -30 "$out/$name.log"
  fi
  tail -3 "$out/$name.log" | sed 's/^/    /'
  return $rc
}

note "ksl-ops GPU check $stamp on $(hostname)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  nvcc --version 2>/dev/null | tail -1; git rev-parse HEAD 2>/dev/null; } | tee "$out/environment.txt"

# 1. Build: only the local GPU's architecture unless TORCH_CUDA_ARCH_LIST says otherwise.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(0); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "8.0;9.0")
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! step build 300 env KSL_OPS_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e .; then
  note "build failed: nothing else can run"; exit 1
fi
step backend 60 "$PY" -c "import ksl_ops, sys; print(ksl_ops.backend()); sys.exit(ksl_ops.backend() != 'cpu+cuda')" || true

# 2. The CUDA tests (device-parametrised and CUDA-only, the sync-debug guard among them).
step tests 180 "$PY" -m pytest -q -p no:cacheprovider "${TEST_FILES[@]}" -k "$TEST_SELECT" \
  --junitxml="$out/tests.xml" || true

# 3. compute-sanitizer on odd sizes: memcheck on the full grid, racecheck on the quick one.
if command -v compute-sanitizer > /dev/null 2>&1; then
  step sanitizer-memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 99 \
    "$PY" bench/gpu_sanitize.py || true
  step sanitizer-racecheck 150 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 99 \
    "$PY" bench/gpu_sanitize.py --quick || true
else
  note "sanitizer: SKIPPED (compute-sanitizer not found); running the odd-size grid without it"
  step odd-sizes 120 "$PY" bench/gpu_sanitize.py || true
fi

# 4. The CUDA kernel bench, every size, into the results folder. The eager reference and its
#    torch.compile are the slow columns; the time left decides whether they run.
left=$(( 470 - $(elapsed) ))
impls=fused,vectorised,vec-compiled,pml
if [ "$left" -gt 300 ]; then impls=fused,reference,vectorised,vec-compiled,pml; fi
if ! "$PY" -c "import pytorch_metric_learning" 2> /dev/null; then
  note "bench: pytorch-metric-learning not installed, its column is skipped (pip install -e '.[bench]')"
fi
if [ "$left" -gt 60 ]; then
  step bench "$left" "$PY" bench/kernels.py --device cuda --sizes all --repeats 30 --impls "$impls" --out "$out" || true
else
  note "bench: SKIPPED, no time left (${left}s)"
fi

note "total: $(elapsed)s; results in $out"
exit $failed
