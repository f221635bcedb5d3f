#!/bin/bash
# Device calls of the FP8 + 2:4 study (issue 9): the prune A/B and the FP8 linear table, the FLUX.1-dev FP8 forwards,
# the FID / KID of the FP8 variants. Ignored files stay on the machine between calls while it is warm (it goes
# back 30 s after a call): reference and quality follow e2e at once, on the same machine.
#   bash benchmarks/fp8_quality_session.sh kernels   carry .whl .cache/cutlass_inc.tar.xz .cache/obj.tgz. Build;
#        the prune / FP8 kernel tests; the prune passes against another build of the prune unit
#        (benchmarks/.old_prune_compress_sm90.cu if present: git show <commit>:csrc/prune_compress_sm90.cu > it),
#        timed and under Nsight Compute; the FP8 linear table.
#   bash benchmarks/fp8_quality_session.sh e2e       carry .whl .cache/cutlass_inc.tar.xz .cache/obj.tgz
#        .cache/inception_fp16.pt{,.sha256} (tree without the mini-FLUX weights: 64 MiB). The GPU tests,
#        compute-sanitizer, the FLUX.1-dev compiled forwards with a profile of each variant.
#   bash benchmarks/fp8_quality_session.sh reference carry .cache/emoji64.npz (tree without the weights): Emoji-64
#        Inception features, kept in .cache/ for the next call (benchmarks/fid_session.sh reference).
#   bash benchmarks/fp8_quality_session.sh quality   carry .whl .cache/cutlass_inc.tar.xz .cache/obj.tgz
#        .cache/prompts_all.txt (the whole tree). FID / KID / PSNR / SSIM of dense, RT-Lynx, RT-Lynx FP8, dense FP8
#        on the mini-FLUX (5000 images, every step sparse), then RT-Lynx and RT-Lynx FP8 with the shipped step
#        schedule.
what=${1:?kernels, e2e, reference or quality}
[ "$what" = reference ] && exec bash benchmarks/fid_session.sh reference
source benchmarks/device_setup.sh
T=(python3 -m pytest -q -p no:cacheprovider -o log_level=WARNING)
case $what in
  kernels)
    old=benchmarks/.old_prune_compress_sm90.cu
    if [ -f $old ]; then  # the other build: the prune unit alone (same C entry points)
      nvcc -std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Xcompiler -fPIC \
        -shared -Icsrc $old -o /tmp/old_prune.so > "$OUT/old_build.txt" 2>&1 &
    fi
    timeout 200 "${T[@]}" tests/gpu/test_fp8_kernels.py tests/gpu/test_sm90_kernels.py tests/gpu/test_sm90_fusion.py \
      > "$OUT/gpu_tests_kernels.txt" 2>&1; tail -4 "$OUT/gpu_tests_kernels.txt"
    wait
    OLD=(); [ -f /tmp/old_prune.so ] && OLD=(--old-lib /tmp/old_prune.so)
    timeout 120 python3 benchmarks/prune_ab.py "${OLD[@]}" --out "$OUT/prune_ab_h200.json" 2>&1 | tee "$OUT/prune_ab.txt"
    timeout 120 ncu -k regex:prune --section SpeedOfLight --section Occupancy --section SchedulerStats \
      --section WarpStateStats --section LaunchStats python3 benchmarks/prune_ab.py --once "${OLD[@]}" \
      > "$OUT/ncu_prune.txt" 2>&1; grep -cE "^  [a-z_(].*prune" "$OUT/ncu_prune.txt"
    timeout 170 python3 benchmarks/fp8.py linear --out benchmarks/results/fp8_h200.json 2>&1 | tail -16 \
      | tee "$OUT/fp8_linear.txt"
    cp benchmarks/results/fp8_h200.json "$OUT/" ;;
  e2e)
    timeout 170 "${T[@]}" tests/gpu > "$OUT/gpu_tests_all.txt" 2>&1; tail -4 "$OUT/gpu_tests_all.txt"
    timeout 90 compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/gpu/sanitize_checks.py \
      > "$OUT/sanitizer.txt" 2>&1; echo "sanitizer rc $?" | tee -a "$OUT/sanitizer.txt"; tail -3 "$OUT/sanitizer.txt"
    timeout ${E2E_S:-280} python3 benchmarks/fp8.py e2e --compile regional --inductor default --profile \
      --out benchmarks/results/fp8_h200.json --variants dense "fp8 recipe" "rtlynx fp8" "rtlynx fp8 + torchao" \
      2>&1 | grep -v "^ *File\|^Thread\|^ *$" | tee "$OUT/fp8_e2e.txt" | cut -c1-400
    cp benchmarks/results/fp8_h200.json "$OUT/" ;;
  quality)
    Q=(python3 benchmarks/quality.py --prompts-file .cache/prompts_all.txt --data none --n 5000 --batch-size 500
       --inception .cache/inception_fp16.pt --reference-features .cache/real_features.npz --backend lynx)
    timeout 330 "${Q[@]}" --variants dense rtlynx rtlynx_fp8 dense_fp8 --out "$OUT/quality_fp8.json" 2>&1 \
      | grep -v "it/s]" | tee "$OUT/quality_fp8_log.txt"
    timeout 240 "${Q[@]}" --variants dense rtlynx rtlynx_fp8 --dense-below-t 0.2 --out "$OUT/quality_fp8_t0.2.json" \
      2>&1 | grep -v "it/s]" | tee "$OUT/quality_fp8_t0.2_log.txt" ;;
esac
date
