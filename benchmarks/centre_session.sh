#!/bin/bash
# Token-mean centring (SparsityConfig.centre, issue 18 item 3): FID of the mini-FLUX with a closed-form LoRA fitted
# for it, against a LoRA fitted the same way without it (same prompts, seeds and steps), on the lynx kernels.
# Two calls to one warm machine (the weights, the Inception and Emoji-64 do not fit one carry; fid_session.sh says why):
#   1. weights moved out here (mkdir -p .qw && mv rtlynx/assets/miniflux/*.safetensors .qw/), carry
#      .cache/inception_fp16.pt(.sha256) .cache/emoji64.npz:   bash benchmarks/centre_session.sh reference
#   2. weights back, carry .whl .cache/cutlass_inc.tar.xz .cache/obj.tgz .cache/prompts_all.txt
#      .cache/prompts_calib512.txt (Emoji-64 prompts, the weighted draw of `rtlynx calibrate`, seed 0):
#      bash benchmarks/centre_session.sh run          (about 5 min; rows written as they come)
# CENTRES="token_mean none" picks the LoRAs (centred first: dense + every step + t < 0.2; the control without centring:
# every step only, its FID against the same dense run's protocol); N (5000) images per FID; RANK (8) the LoRA rank;
# FID=0 only the LoRAs (e.g. the start of a global distillation at rank 16 / 32: $OUT/lora.tgz).
#   3. bash benchmarks/centre_session.sh verify   (carry .whl .cache/cutlass_inc.tar.xz .cache/obj.tgz; ~4 min)
#      the centring GPU tests (the centring prune kernels bit for bit, FP8 centre rows, sites vs spec, fullgraph) and
#      the FP8 site op's tail, then FLUX.1-dev compiled with and without centring and the rank-8 / fill compensation LoRA
#      (fp8.py e2e, profiled), rows in $OUT/centre_speed.json. TESTS=0: the timings only (the tests ran in an earlier
#      call, e.g. quality_global_session.sh prep: then also WHEELS=none BUILD=0 PYTHONPATH=$PWD/.cache/site).
stage=${1:?stage: reference, run or verify}
case $stage in
  reference)
    bash benchmarks/fid_session.sh reference ;;
  run)
    source benchmarks/device_setup.sh
    W=/tmp/centre; mkdir -p $W
    for c in ${CENTRES:-token_mean none}; do
      t0=$(date +%s)
      python3 -m rtlynx calibrate --model miniflux --prompts-file .cache/prompts_calib512.txt --num-prompts 512 \
        --batch-size 256 --steps 20 --preset flux --centre $c --out $W/calib_$c.safetensors --overwrite 2>&1 \
        | grep -v "it/s]\|s/it]\|batch/s]\|s/batch]" | tail -3
      python3 -m rtlynx train-lora --model miniflux --calib $W/calib_$c.safetensors --rank ${RANK:-8} --dense-below-t none \
        --out $W/lora_$c --overwrite 2>&1 | tail -2
      echo "centre $c: calibrate + train-lora $(( $(date +%s) - t0 )) s"
      tar czf "$OUT/lora.tgz" -C $W $(cd $W && ls -d lora_*)  # every LoRA so far, one file ($OUT: 8 at most)
      [ "${FID:-1}" = 1 ] || continue
      v="rtlynx"; [ $c != none ] && v="dense rtlynx rtlynx_t0.2"
      python3 benchmarks/quality.py --prompts-file .cache/prompts_all.txt --data none --n ${N:-5000} \
        --batch-size 500 --inception .cache/inception_fp16.pt --reference-features .cache/real_features.npz \
        --backend lynx --lora-dir $W/lora_$c --variants $v --out "$OUT/quality_centre_$c.json" 2>&1 \
        | grep -v "it/s]\|s/it]" | tail -8
    done ;;
  verify)
    source benchmarks/device_setup.sh
    [ "${TESTS:-1}" = 0 ] || timeout ${TEST_S:-240} python3 -m pytest -q -p no:cacheprovider -o log_level=WARNING tests/gpu/test_centre_gpu.py \
      tests/gpu/test_fp8_kernels.py tests/gpu/test_user_lora_gpu.py 2>&1 | grep -v "^DEBUG" > "$OUT/centre_tests.txt"
    [ "${TESTS:-1}" = 0 ] || tail -5 "$OUT/centre_tests.txt"
    timeout ${E2E_S:-300} python3 benchmarks/fp8.py e2e --variants dense "rtlynx bf16" "rtlynx bf16 centred" \
      "rtlynx bf16 centred + LoRA r8" "rtlynx bf16 centred + LoRA fill" "rtlynx fp8" "rtlynx fp8 centred" \
      "rtlynx fp8 centred + LoRA r8" "rtlynx fp8 centred + LoRA fill" --compile regional --inductor default --reps 20 --profile \
      --out "$OUT/centre_speed.json" 2>&1 | grep -v "Warning\|warn(" | tail -12 ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
