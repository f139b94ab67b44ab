#!/usr/bin/env bash
# One device call on the H200: the benchmark presets, then the GPU test suite, inside a time budget.
#
# Usage (device tool, from the repository root):
#   bash scripts/gpu_run.sh [preset ...]            default presets: paper; "none" runs no benchmark
# Environment:
#   NSA_BUDGET=570          seconds for the whole script (the device tool allows 600 per call)
#   NSA_TEST_RESERVE=240    seconds kept for the GPU tests after the benchmarks (2026-11-28: 80 tests took 151 s; the suite has grown since)
#   NSA_BENCH_ARGS=""       extra arguments for every `nsa bench` run (e.g. "--dims 128x128")
#   NSA_GPU_TESTS=1         0 skips the tests;  NSA_GPU_WORKERS=3 pytest-xdist workers
#   NSA_GPU_TEST_ARGS=""    extra pytest arguments, shell-quoted (e.g. -k 'selected or window')
#   NSA_PROBE=""            parts of benchmarks/probe.py to run first at T=64k (e.g. "fwdmodes dqmodes")
#   NSA_GIT_REV=""          the commit the copied tree was made from, recorded in the benchmark's
#                           header and JSON (the copy's own .git may be stale: give it explicitly)
# Results in $OUT: env.txt, probe.log, bench_<preset>.{json,png,log}, gpu_tests.log
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET="${NSA_BUDGET:-570}"
RESERVE="${NSA_TEST_RESERVE:-240}"
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

if [ "${NSA_GPU_TESTS:-1}" = "1" ]; then
  t=$(( $(left) ))
  if [ "$t" -ge 30 ]; then
    # Compilation is CPU-bound: spread the tests over a few workers (pytest-xdist is on the image);
    # more workers than that run the big-memory tests into each other.
    # NSA_GPU_TEST_ARGS as shell words: quotes keep an expression together (-k 'a or b')
    eval "test_args=(${NSA_GPU_TEST_ARGS:-})"
    PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}" \
      timeout "$t" python3 -m pytest -v -p no:cacheprovider -n "${NSA_GPU_WORKERS:-3}" -m gpu tests/gpu \
      "${test_args[@]}" -rfE > "$OUT/gpu_tests.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "gpu tests: killed at their ${t}s budget" >> "$OUT/gpu_tests.log"
    status=$((status | rc))
    grep -E "FAILED|ERROR|passed|failed|killed" "$OUT/gpu_tests.log" | tail -n 40
  else
    echo "skip gpu tests: budget spent"
  fi
fi
echo "gpu_run.sh: $(( $(date +%s) - START ))s, status $status"
exit $status
