#!/usr/bin/env bash
# One device call on the H200: the GPU test suite, then the benchmark.
# Results (at most 8 files) land in $OUT:
#   env.txt, gpu_tests.log, [kernel_tests.log], bench.log, bench.json, bench.png
# Environment: NSA_KERNEL_TESTS=1 also runs the CI kernel tables on the GPU.
# Usage (device tool): bash scripts/gpu_run.sh [preset] [extra nsa-bench args...]
# Environment: NSA_GPU_TESTS=0 skips the tests; NSA_BENCH=0 skips the benchmark.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PRESET="${1:-paper}"
shift || true

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  git rev-parse --short HEAD 2>/dev/null && git status --short | head -20
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
if [ "${NSA_KERNEL_TESTS:-0}" = "1" ]; then
  # The CI interpreter table compiled for real: many tiny shapes, each a compile; opt-in.
  timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 tests/ops/test_*_triton.py -rfE 2>&1 | tee "$OUT/kernel_tests.log" | tail -n 5
  status=$((status | ${PIPESTATUS[0]}))
fi
if [ "${NSA_GPU_TESTS:-1}" = "1" ]; then
  # Real-size GPU tests (bf16, T = 4k..128k, int64 addressing). Compilation is CPU-bound:
  # spread the tests over several workers (pytest-xdist is on the device image).
  timeout "${NSA_GPU_TEST_TIMEOUT:-300}" python3 -m pytest -v -p no:cacheprovider -n "${NSA_GPU_WORKERS:-6}" \
    -m gpu tests/gpu ${NSA_GPU_TEST_ARGS:-} -rfE 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -n 40
  status=$((status | ${PIPESTATUS[0]}))
fi
if [ "${NSA_BENCH:-1}" = "1" ]; then
  python3 -m nsa.bench --preset "$PRESET" --json "$OUT/bench.json" --plot "$OUT/bench.png" "$@" 2>&1 | tee "$OUT/bench.log" | tail -n 60
  status=$((status | ${PIPESTATUS[0]}))
fi
exit $status
