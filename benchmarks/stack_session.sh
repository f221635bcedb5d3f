#!/bin/bash
# One device call of the composed fast-FLUX stack (issue 19, items 1, 2 and 4), under 9 minutes in all. Carry what
# benchmarks/device_setup.sh lists: .whl (diffusers + importlib_metadata, torchao 0.17.0 for the recipe,
# sageattention 1.0.6 for the attention table, cache-dit 1.5.3 for the "+ cache" rows; a wheel that is absent only
# skips its rows) and .cache/cutlass_inc.tar.xz (or prebuilt objects, .cache/obj.tgz); benchmarks/device_files.sh
# makes them on a fresh checkout.
#   RTLYNX_COMMIT=<sha> bash benchmarks/stack_session.sh
# Stages, each under its own timeout, every result written row by row into $OUT (at most 8 files come back):
#   setup      wheels into /tmp/site, the kernels built (~2 min; benchmarks/device_setup.sh)
#   tests      CUDA graphs across steps (tests/gpu/test_cudagraph_steps.py) + the attention dispatcher (TESTS_S, 100 s)
#   attention  benchmarks/attention.py at the three models' attention shapes (ATTN_S, 70 s)
#   stack      benchmarks/stack.py: MODEL's pipeline (flux, qwen-image, z-image) seconds per image at its own default
#              steps (STEPS= overrides), the variants in VARIANTS (comma-
#              separated; default below, most wanted first), whatever is left before DEADLINE (530 s after the start)
#              as its --time-budget
#   sage2      (not in the default list) SageAttention 2 built from .cache/sage2_src.tgz into /tmp/site (SAGE_S, 420 s)
# STAGES="tests attention stack" (default) picks stages; the logs of all of them go to $OUT/session_log.txt.
T0=$(date +%s)
DEADLINE=${DEADLINE:-530}
source benchmarks/device_setup.sh
LOG="$OUT/session_log.txt"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
stage() { echo "== $1: $(( $(date +%s) - T0 )) s into the call, $(left) s left" | tee -a "$LOG"; }
for what in ${STAGES:-tests attention stack}; do
  case $what in
    tests)
      stage tests
      timeout ${TESTS_S:-100} python3 -m pytest -q -p no:cacheprovider -o log_level=WARNING \
        tests/gpu/test_cudagraph_steps.py tests/test_attention_backends.py tests/test_cudagraphs.py \
        > "$OUT/tests.txt" 2>&1
      echo "tests rc $?" | tee -a "$OUT/tests.txt"; tail -5 "$OUT/tests.txt" | tee -a "$LOG" ;;
    sage2)  # SageAttention 2 from source (.cache/sage2_src.tgz, device_files.sh SAGE2=): its sm90 INT8-QK / FP8-PV
      # kernel for the attention table; the build time is one of issue 19's numbers. Run it before "attention".
      stage sage2
      build_sage2 2>&1 | tee -a "$LOG" ;;
    attention)
      stage attention
      timeout ${ATTN_S:-70} python3 benchmarks/attention.py --reps ${ATTN_REPS:-20} --out "$OUT/attention.json" \
        2>&1 | grep -v "Warning\|warn(" | tee -a "$LOG" ;;
    stack)
      stage stack
      budget=$(( $(left) - 15 ))
      [ "$budget" -gt 60 ] || { echo "stack: no time left ($budget s)" | tee -a "$LOG"; continue; }
      IFS=',' read -ra V <<< "${VARIANTS:-dense,dense compiled,rtlynx fp8,recipe,rtlynx fp8 t<0.2,rtlynx bf16,recipe + cache,rtlynx fp8 + cache}"
      timeout $(( budget + 10 )) python3 benchmarks/stack.py --model "${MODEL:-flux}" ${STEPS:+--steps $STEPS} --reps "${REPS:-2}" \
        --time-budget $budget --compile "${COMPILE:-regional}" --out "$OUT/stack.json" --variants "${V[@]}" \
        2>&1 | grep -v "Warning\|warn(" | tee -a "$LOG" ;;
    *) echo "unknown stage $what" | tee -a "$LOG" ;;
  esac
done
stage done
ls -la "$OUT"
