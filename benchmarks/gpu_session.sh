#!/bin/bash
# One device call: build (cached objects carried in .cache/build), GPU tests, sanitizer, benchmark.
# Usage on the device machine:  bash benchmarks/gpu_session.sh [tests|bench|all|ncu] [extra bench args]
set -o pipefail
OUT=${OUT:-/tmp/rtlynx_out}; mkdir -p "$OUT"
what=${1:-all}; shift || true
export RTLYNX_BUILD_DIR=${RTLYNX_BUILD_DIR:-$PWD/.cache/build}
export CUTLASS_INCLUDE=${CUTLASS_INCLUDE:-$PWD/.cache/cutlass/include}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  date; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/env.txt"
t0=$(date +%s)
python3 -m rtlynx.ops._build 2>&1 | tee "$OUT/build.txt" || { echo BUILD FAILED; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"
export RTLYNX_LIB=$(tail -2 "$OUT/build.txt" | grep '\.so$')
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
