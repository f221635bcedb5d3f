#!/usr/bin/env bash
# The fill LoRA on the GPU (issue 18, NOTES v21): four calls chained on one warm machine (each within 30 s of the
# last; ignored files stay there between calls). Every stage runs from the repository root with the device's $OUT;
# RTLYNX_COMMIT=<full sha> names the commit in the results.
#   a  weights in the tree; carry .whl (diffusers + importlib_metadata) .cache/cutlass_inc.tar.xz .cache/obj.tgz
#      .cache/prompts_all.txt .cache/prompts_calib512.txt (~8.5 min): the kernels (prep: the three tests that failed
#      at 41da60a), the fill closed form (quality_global_session.sh fill), then side by side two trainings for the
#      step schedule (from the fill closed form -> .cache/gfs; from the shipped 500-step LoRA grown to fill ranks ->
#      .cache/ggs; 150 steps each) and compute-sanitizer on tests/gpu/sanitize_small.py
#   b  weights out here (mkdir -p .cache/qw && mv rtlynx/assets/miniflux/*.safetensors .cache/qw/, back after the
#      chain); carry .cache/inception_fp16.pt .cache/inception_fp16.pt.sha256 .cache/prompts_all.txt (seconds)
#   c  weights out; carry .cache/emoji64.npz (~6.5 min): reference features, then FID of the fill closed form (dense,
#      every step, t < 0.2, FP8 t < 0.2) and of both trainings (t < 0.2), all paired against one dense run
#   d  weights out, nothing carried (~5 min): FLUX.1-dev speed rows with centring and the rank-8 / fill tails
#   e  weights in the tree; carry .cache/emoji64.npz .cache/user_style_adapter.safetensors (~6 min): the compensation
#      fitted with a user's style adapter on (issue 20, NOTES v22), at GPU scale: closed form on 256 user prompts,
#      300 global steps from the shipped LoRA, the dense-FP8 control; the 16 held-out prompts of the CPU runs (the
#      cached adapter was trained without them)
# $OUT holds at most 8 files: each stage tars its own, and logs go to $OUT/calls_<stage>.txt.
#   run: bash benchmarks/fill_session.sh {a|b|c|d|e}
set -uo pipefail
S=benchmarks/quality_global_session.sh
stage=${1:?a, b, c, d or e}; L=${OUT:-/tmp/out}/calls_$stage.txt; mkdir -p "$(dirname "$L")"
case $stage in
  a)
    GATE=0 SUITE_S=70 SUITE="tests/gpu/test_centre_gpu.py::test_centred_fp8_prune_is_the_twin_bit_for_bit
      tests/gpu/test_centre_gpu.py::test_fp8_centred_sites_match_the_spec
      tests/gpu/test_fp8_kernels.py::test_reference_quantisation_is_the_same_on_cuda_and_cpu" bash $S prep >> "$L" 2>&1
    bash $S fill >> "$L" 2>&1
    [ -f .cache/fill/lora/rtlynx_config.json ] || { echo "no fill LoRA: see $L"; tail -20 "$L"; exit 3; }
    C="--checkpointing --sdpa efficient"
    GL=.cache/gfs TAG=fs TRAIN_ARGS="--init .cache/fill/lora --train-for-schedule --eval-every 75" STEPS=150 FID=0 \
      CHOSEN="$C" TRAIN_S=${TRAIN_S:-285} bash $S train >> "$L" 2>&1 &
    GL=.cache/ggs TAG=gf TRAIN_ARGS="--init benchmarks/results/centre_global500_h100_lora --grow-rank fill
      --train-for-schedule --eval-every 75" STEPS=150 FID=0 CHOSEN="$C" TRAIN_S=${TRAIN_S:-285} bash $S train >> "$L" 2>&1 &
    if [ -f .cache/lib.txt ]; then
      (PYTHONPATH=$PWD/.cache/site:$PWD RTLYNX_LIB=$(cat .cache/lib.txt) timeout 150 compute-sanitizer --tool memcheck \
        --error-exitcode 1 python3 tests/gpu/sanitize_small.py > "${OUT:-/tmp/out}/sanitizer.txt" 2>&1
       echo "sanitizer rc $?" >> "${OUT:-/tmp/out}/sanitizer.txt") &
    fi
    wait
    grep -a "passed\|failed\|fill:\|val_rel_err\|stopped\|Error\|sanitizer" "$L" "${OUT:-/tmp/out}/sanitizer.txt" | tail -20 ;;
  b)
    bash $S inception >> "$L" 2>&1; tail -3 "$L" ;;
  c)
    USE_LYNX=0 bash $S reference >> "$L" 2>&1
    GL=.cache/fill TAG=fill VARIANTS="dense rtlynx rtlynx_t0.2 rtlynx_fp8_t0.2" EVAL_S=300 bash $S evalonly >> "$L" 2>&1
    for p in fs:.cache/gfs gf:.cache/ggs; do  # tag:LoRA folder of stage a's two trainings
      GL=${p#*:} TAG=${p%%:*} VARIANTS="rtlynx_t0.2" EVAL_S=120 bash $S evalonly >> "$L" 2>&1
    done
    grep -a "^dense \|^rtlynx\|reference features" "$L" ;;
  d)
    TESTS=0 WHEELS=none BUILD=0 PYTHONPATH=$PWD/.cache/site E2E_S=${E2E_S:-330} bash benchmarks/centre_session.sh verify \
      >> "$L" 2>&1; tail -14 "$L" ;;
  e)
    export PYTHONPATH=$PWD/.cache/site:$PWD RTLYNX_BUILD_DIR=$PWD/.cache/build PYTHONUNBUFFERED=1  # as stage a left them
    [ -f .cache/lib.txt ] && export RTLYNX_LIB=$(cat .cache/lib.txt)
    timeout ${ADAPTER_S:-420} python3 benchmarks/user_lora_compensation.py --device cuda --n 16 --cal 256 \
      --global-steps 300 --batch 128 --rollout-prompts 64 --refresh 50 --sample-steps 15 --eval-every 100 \
      --fp8-control --out "${OUT:-/tmp/out}/user_lora_compensation_h100.json" >> "$L" 2>&1
    grep -a "^{\|wrote\|Error" "$L" | tail -8 ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
