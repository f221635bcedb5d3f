#!/bin/bash
# One device call of the end-to-end work (issue 8). Carry what benchmarks/device_setup.sh lists (.whl, the CUTLASS
# headers, optionally prebuilt objects in .cache/build).
#   bash benchmarks/e2e_session.sh eager      build, site tests, eager rows of the three models (+ split, check)
#   bash benchmarks/e2e_session.sh compiled MODEL...   torch.compile rows, one model per call (REGIONAL=1: each
#                                                     repeated block, the way Qwen-Image's compile fits a call)
#   bash benchmarks/e2e_session.sh tests      the whole GPU suite
#   bash benchmarks/e2e_session.sh ab         one e2e row (FLUX.1-dev, regional compile, FP8 sites) on an older
#        build and on this one, alternating, in one call: carry .cache/old_src.tgz (`git archive OLD`) and
#        optionally .cache/obj_old.tgz (its kernel objects); set OLD_COMMIT=OLD and RTLYNX_COMMIT=this commit
# Rows merge into benchmarks/results/e2e_h200.json, copied to $OUT at the end of every step.
what=${1:-eager}; shift || true
source benchmarks/device_setup.sh
RES=benchmarks/results/e2e_h200.json
save() { cp "$RES" "$OUT/" 2>/dev/null; true; }
case $what in
  eager)
    timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_sites_gpu.py \
      "tests/gpu/test_sm90_kernels.py::test_prune_lora_tail" "tests/gpu/test_sm90_kernels.py::test_lynx_linear" \
      2>&1 | tail -15 | tee "$OUT/site_tests.txt"
    timeout 60 python3 benchmarks/host_overhead.py 2>&1 | tee "$OUT/host_overhead.txt"
    cp benchmarks/results/host_overhead_*.json "$OUT/" 2>/dev/null
    for m in flux qwen-image z-image; do
      timeout 200 python3 benchmarks/e2e.py --models $m --out $RES --profile --check \
        --variants dense rtlynx "rtlynx + LoRA r64" "rtlynx per-layer (v0.1)" 2>&1 | tee -a "$OUT/e2e_eager.txt"
      save
    done ;;
  compiled)
    if [ -n "$GPU_TESTS" ]; then
      # GPU_TESTS=1: the whole GPU suite; else the paths it names
      [ "$GPU_TESTS" = 1 ] && GPU_TESTS="tests/gpu tests/test_lynx_integration.py tests/test_backends_cuda.py"
      timeout 240 python3 -m pytest -q -p no:cacheprovider $GPU_TESTS --durations=5 -o log_level=WARNING 2>&1 \
        | grep -v "^DEBUG" | tee "$OUT/gpu_tests.txt" | tail -30
    fi
    for m in "$@"; do
      timeout 280 python3 benchmarks/e2e.py --models $m --out $RES --compile ${REGIONAL:+--regional} --reps 20 \
        --variants dense rtlynx 2>&1 | tee -a "$OUT/e2e_compiled.txt"
      save
    done ;;
  ab)
    mkdir -p /tmp/old/.cache/build && tar xzf .cache/old_src.tgz -C /tmp/old
    [ -f .cache/obj_old.tgz ] && tar xzf .cache/obj_old.tgz -C /tmp/old/.cache/build
    # the old tree links (or builds) its own library at its first kernel call, in its own build folder
    old_env=(env -u RTLYNX_LIB RTLYNX_BUILD_DIR=/tmp/old/.cache/build PYTHONPATH=/tmp/site:/tmp/old
             RTLYNX_COMMIT=${OLD_COMMIT:-old})
    # inductor defaults: the recipe's coordinate-descent tuning compiles for minutes on a cold machine (2026-12-07)
    A=(--variants dense "rtlynx fp8" --compile regional --mode default --inductor ${INDUCTOR:-default} --reps ${REPS:-20} ${PROFILE:+--profile})
    for i in $(seq ${ROUNDS:-2}); do  # old, new, old, new: drift of the machine shows as a difference between rounds
      (cd /tmp/old && "${old_env[@]}" timeout ${AB_S:-200} python3 benchmarks/fp8.py e2e \
        --out "$OUT/ab_old.json" "${A[@]}") 2>&1 | grep -v "^DEBUG" | tee -a "$OUT/ab.txt"
      timeout ${AB_S:-200} python3 benchmarks/fp8.py e2e --out "$OUT/ab_new.json" "${A[@]}" 2>&1 | grep -v "^DEBUG" \
        | tee -a "$OUT/ab.txt"
    done ;;
  tests)
    timeout 500 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_lynx_integration.py \
      tests/test_backends_cuda.py --durations=5 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt" ;;
esac
save
date
