#!/bin/bash
# One device call of the users' adapters in the LoRA tail (issue 20, item 2). Carry what benchmarks/device_setup.sh
# lists (.whl with diffusers + peft, the CUTLASS headers, optionally prebuilt objects in .cache/build).
#   bash benchmarks/user_lora_session.sh tests         build, the adapter GPU tests and the site / FP8 suites
#   bash benchmarks/user_lora_session.sh bench [VARIANT...]   FLUX.1-dev compiled rows (all variants when none is
#        named; rows merge into benchmarks/results/user_lora_<device>.json)
# PROFILE=1: one profiled forward per variant after its timing (GPU ms per kernel class: what the adapter adds)
# COMPILE=regional: diffusers' compile_repeated_blocks (seconds of compiling instead of minutes: all six in one call)
# MODE=reduce-overhead: every variant under CUDA graphs (host time out of the adapter's cost); rows of another mode
# cannot share a file: ULOUT=benchmarks/results/user_lora_<device>_graphs.json
# e.g.  bench dense "dense + LoRA r16" "rtlynx bf16"  /  bench "rtlynx bf16 + LoRA r16" "rtlynx fp8"  /
#       bench "rtlynx fp8 + LoRA r16"
what=${1:-tests}; shift || true
source benchmarks/device_setup.sh
save() { cp benchmarks/results/user_lora_*.json "$OUT/" 2>/dev/null; true; }
case $what in
  tests)
    timeout ${TEST_S:-400} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_user_lora_gpu.py \
      tests/gpu/test_sites_gpu.py tests/gpu/test_fp8_kernels.py -o log_level=WARNING 2>&1 \
      | grep -v "^DEBUG" > "$OUT/user_lora_tests.txt"; tail -20 "$OUT/user_lora_tests.txt" ;;
  bench)
    timeout ${BENCH_S:-540} python3 benchmarks/user_lora.py --compile ${COMPILE:-full} ${PROFILE:+--profile} \
      ${MODE:+--mode $MODE} ${ULOUT:+--out $ULOUT} \
      ${1:+--variants "$@"} 2>&1 | tee -a "$OUT/user_lora_bench.txt"
    save ;;
esac
save
