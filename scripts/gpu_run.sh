#!/usr/bin/env bash
# One device call on the H200: the GPU test suite, then the benchmark.
# Results (at most 8 files) land in $OUT:
#   env.txt, gpu_tests.log, kernel_tests.log, bench.log, bench.json, bench.png
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
if [ "${NSA_GPU_TESTS:-1}" = "1" ]; then
  # Kernel-vs-reference tests at tiny sizes (the CI table, compiled for real) ...
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/ops 2>&1 | tail -n 40 > "$OUT/kernel_tests.log"
  status=$((status | ${PIPESTATUS[0]}))
  tail -n 5 "$OUT/kernel_tests.log"
  # ... and the real-size GPU tests (bf16, T = 4k..128k, int64 addressing).
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rfE 2>&1 | tail -n 60 > "$OUT/gpu_tests.log"
  status=$((status | ${PIPESTATUS[0]}))
  tail -n 15 "$OUT/gpu_tests.log"
fi
if [ "${NSA_BENCH:-1}" = "1" ]; then
  python3 -m nsa.bench --preset "$PRESET" --json "$OUT/bench.json" --plot "$OUT/bench.png" "$@" 2>&1 | tee "$OUT/bench.log" | tail -n 60
  status=$((status | ${PIPESTATUS[0]}))
fi
exit $status
