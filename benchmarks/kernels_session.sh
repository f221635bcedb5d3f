#!/bin/bash
# One device call of the bf16/fp16 kernels: build (benchmarks/device_setup.sh; no wheels needed: WHEELS=none unless
# set), the GPU tests, compute-sanitizer, the linear-layer timings (benchmarks/linear.py), an Nsight Compute profile.
# Usage on the device machine:  bash benchmarks/kernels_session.sh [tests|bench|all|ncu] [extra bench args]
what=${1:-all}; shift || true
WHEELS=${WHEELS:-none} source benchmarks/device_setup.sh
if [[ $what == all || $what == tests ]]; then
  timeout 300 python3 -m pytest -m gpu tests/gpu -x -q -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/tests.txt"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/gpu/sanitize_small.py 2>&1 \
    | tail -25 | tee "$OUT/sanitizer.txt"
fi
if [[ $what == all || $what == bench ]]; then
  timeout 400 python3 benchmarks/linear.py --out "$OUT/h100_linear.json" "$@" 2>&1 | tee "$OUT/bench.txt"
fi
if [[ $what == all || $what == ncu ]]; then
  timeout 150 ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    -k regex:'device_kernel|prune' --launch-skip 2 --launch-count 2 python3 benchmarks/ncu_one.py 4608 3072 12288 \
    > "$OUT/ncu.txt" 2>&1; grep -E "prune_compress|device_kernel|Throughput|Duration|Achieved Occupancy" "$OUT/ncu.txt" | cut -c1-150 | head -30
fi
date
