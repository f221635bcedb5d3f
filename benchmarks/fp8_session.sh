#!/bin/bash
# One device call of the FP8 + 2:4 work (issue 9). Carry: .whl (diffusers, importlib_metadata, torchao 0.17.0 wheels),
# .cache/cutlass_inc.tar.xz (CUTLASS headers) and .cache/build (kernel objects prebuilt on a CPU machine, if any).
#   bash benchmarks/fp8_session.sh kernels     build, FP8 kernel + site tests, the linear table (config sweep)
#   bash benchmarks/fp8_session.sh e2e         FLUX.1-dev compiled forwards: bf16, flux-fast FP8 recipe, rtlynx FP8
# Results merge into benchmarks/results/fp8_h200.json, copied to $OUT after every step.
what=${1:-kernels}; shift || true
source benchmarks/device_setup.sh
RES=benchmarks/results/fp8_h200.json
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
esac
save
date
