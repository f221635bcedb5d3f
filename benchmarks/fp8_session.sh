#!/bin/bash
# One device call of the FP8 + 2:4 work (issue 9). Carry: .whl (diffusers, importlib_metadata, torchao 0.17.0 wheels),
# .cache/cutlass_inc.tar.xz (CUTLASS headers) and .cache/build (kernel objects prebuilt on a CPU machine, if any).
#   bash benchmarks/fp8_session.sh kernels     build, FP8 kernel + site tests, the linear table (config sweep)
#   bash benchmarks/fp8_session.sh e2e         FLUX.1-dev compiled forwards: bf16, flux-fast FP8 recipe, rtlynx FP8
#   bash benchmarks/fp8_session.sh quality     FP8 quality on the shipped mini-FLUX (FID protocol)
# Results merge into benchmarks/results/fp8_h200.json, copied to $OUT after every step.
set -o pipefail
OUT=${OUT:-/tmp/rtlynx_out}; mkdir -p "$OUT"
what=${1:-kernels}; shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MAX_JOBS=16
export RTLYNX_BUILD_DIR=$PWD/.cache/build
# CUTLASS headers: .cache/cutlass/include, or the same packed as .cache/cutlass_inc.tar.xz (1 MB instead of 28)
if [ -f .cache/cutlass_inc.tar.xz ]; then mkdir -p /tmp/cutlass && tar xJf .cache/cutlass_inc.tar.xz -C /tmp/cutlass; fi
export CUTLASS_INCLUDE=$PWD/.cache/cutlass/include; [ -d "$CUTLASS_INCLUDE" ] || CUTLASS_INCLUDE=/tmp/cutlass/include
RES=benchmarks/results/fp8_h200.json
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv | tee "$OUT/env.txt"
t0=$(date +%s)
python3 -m rtlynx.ops._build 2>&1 | tail -3 | tee "$OUT/build.txt" || { echo BUILD FAILED; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"
export RTLYNX_LIB=$(grep '\.so$' "$OUT/build.txt" | tail -1)
[ -f "$RTLYNX_LIB" ] || { echo "no library"; cat "$OUT/build.txt"; exit 1; }
tar czf "$OUT/obj.tgz" -C .cache/build obj 2>/dev/null  # objects for later calls (one file: the copy-back limits count)
save() { cp "$RES" "$OUT/" 2>/dev/null; true; }
case $what in
  kernels)
    timeout ${TEST_S:-170} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_kernels.py ${GPU_TESTS} \
      -o log_level=WARNING 2>&1 > "$OUT/fp8_tests_full.txt"; tail -15 "$OUT/fp8_tests_full.txt"
    timeout ${LIN_S:-220} python3 benchmarks/fp8.py linear --sweep --out $RES 2>&1 | tee "$OUT/fp8_linear.txt"
    save ;;
  e2e)
    if [ -n "$FP8_TESTS" ]; then
      timeout ${TEST_S:-90} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_kernels.py \
        -o log_level=WARNING 2>&1 > "$OUT/fp8_tests_full.txt"; tail -15 "$OUT/fp8_tests_full.txt"
    fi
    timeout ${E2E_S:-520} python3 benchmarks/fp8.py e2e --out $RES "$@" 2>&1 | tee "$OUT/fp8_e2e.txt"
    save ;;
  quality)
    timeout ${Q_S:-520} python3 benchmarks/fp8.py quality --out $RES "$@" 2>&1 | tee "$OUT/fp8_quality.txt"
    save ;;
esac
save
date
