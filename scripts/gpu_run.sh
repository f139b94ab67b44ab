#!/usr/bin/env bash
# One device call on the H100 or H200: the benchmark presets, then the GPU test suite, inside a time budget.
#
# Usage (device tool, from the repository root):
#   bash scripts/gpu_run.sh [preset ...]            default presets: paper; "none" runs no benchmark
# Environment:
#   NSA_BUDGET=570          seconds for the whole script (the device tool allows 600 per call)
#   NSA_TEST_RESERVE=300    seconds kept for the GPU tests after the benchmarks (2026-11-29, run 52: 120 tests took 171 s
#                           on 3 workers; the bigmem ones now run one at a time after the rest)
#   NSA_BENCH_ARGS=""       extra arguments for every `nsa bench` run (e.g. "--dims 128x128")
#   NSA_GPU_TESTS=1         0 skips the tests;  NSA_GPU_WORKERS=3 pytest-xdist workers (for all but the bigmem tests)
#   NSA_BIGMEM_RESERVE=120  seconds of the tests' time kept for the bigmem tests, which run one at a time after the rest
#   NSA_GPU_TEST_ARGS=""    extra pytest arguments, shell-quoted (e.g. -k 'selected or window')
#   NSA_PROBE=""            parts of benchmarks/probe.py to run first at T=64k (e.g. "fwdmodes dqmodes")
#   NSA_GIT_REV=""          the commit the copied tree was made from, recorded in the benchmark's
#                           header and JSON (the copy's own .git may be stale: give it explicitly)
# Results in $OUT: env.txt, probe.log, bench_<preset>.{json,png,log}, gpu_tests.log, gpu_tests_bigmem.log
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET="${NSA_BUDGET:-570}"
RESERVE="${NSA_TEST_RESERVE:-300}"
[ "${NSA_GPU_TESTS:-1}" = "1" ] || RESERVE=0
PRESETS=("$@")
[ ${#PRESETS[@]} -gt 0 ] || PRESETS=(paper)
[ "${PRESETS[*]}" = "none" ] && PRESETS=()
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  echo "commit: ${NSA_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null)}"
  echo "presets: ${PRESETS[*]}  bench args: ${NSA_BENCH_ARGS:-}"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
if [ -n "${NSA_PROBE:-}" ]; then
  # shellcheck disable=SC2086
  timeout $(( $(left) - RESERVE - 30 )) python3 benchmarks/probe.py --parts ${NSA_PROBE} --Ts 65536 \
    > "$OUT/probe.log" 2>&1 || status=1
  cat "$OUT/probe.log"
fi
for preset in "${PRESETS[@]}"; do
  t=$(( $(left) - RESERVE ))
  if [ "$t" -lt 30 ]; then echo "skip bench $preset: budget spent"; status=1; continue; fi
  # shellcheck disable=SC2086
  timeout "$t" python3 -m nsa.bench --preset "$preset" --no-progress ${NSA_BENCH_ARGS:-} \
    --json "$OUT/bench_$preset.json" --plot "$OUT/bench_$preset.png" > "$OUT/bench_$preset.log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "bench $preset: killed at its ${t}s budget" >> "$OUT/bench_$preset.log"
  status=$((status | rc))
  tail -n 45 "$OUT/bench_$preset.log"
done

# gpu_tests EXPR LOG SECONDS [pytest args]: the tests of tests/gpu marked "gpu and (EXPR)", killed after SECONDS
gpu_tests() {
  local expr=$1 log=$2 t=$3
  shift 3
  if [ "$t" -lt 30 ]; then echo "skip gpu tests ($expr): budget spent"; status=1; return; fi
  timeout "$t" python3 -m pytest -v -p no:cacheprovider "$@" -m "gpu and ($expr)" tests/gpu "${test_args[@]}" \
    -rfE --durations=20 > "$log" 2>&1
  local rc=$?
  [ $rc -eq 5 ] && rc=0  # none of these tests selected (NSA_GPU_TEST_ARGS -k ...)
  [ $rc -eq 124 ] && echo "gpu tests ($expr): killed at their ${t}s budget" >> "$log"
  status=$((status | rc))
  grep -E "FAILED|ERROR|passed|failed|killed|no tests ran" "$log" | tail -n 40
}

if [ "${NSA_GPU_TESTS:-1}" = "1" ]; then
  # NSA_GPU_TEST_ARGS as shell words: quotes keep an expression together (-k 'a or b')
  eval "test_args=(${NSA_GPU_TEST_ARGS:-})"
  export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
  # Compilation is CPU-bound: spread the tests over a few workers (pytest-xdist is on the image).
  # The bigmem tests (> 2^31 elements, T = 128k; run 7's out-of-memory report shows processes of 48 and
  # 52 GB) then run one at a time in one process: side by side on the 80 GB H100, 3 workers ran 7 of
  # them out of memory; alone each fits.
  gpu_tests "not bigmem" "$OUT/gpu_tests.log" $(( $(left) - ${NSA_BIGMEM_RESERVE:-120} )) -n "${NSA_GPU_WORKERS:-3}"
  gpu_tests "bigmem" "$OUT/gpu_tests_bigmem.log" "$(left)"
fi
echo "gpu_run.sh: $(( $(date +%s) - START ))s, status $status"
exit $status
