#!/bin/bash
# One device call of the multi-GPU work (issue 12). Carry what benchmarks/device_setup.sh lists (.whl with the
# diffusers wheel, the CUTLASS headers, optionally prebuilt objects in .cache/obj.tgz).
#   bash benchmarks/multi_gpu_session.sh one            nvidia-h200: the CPU multi-process tests, the one-GPU test of
#                                                       the row-parallel lynx path, the 1-GPU rows of both models
#   bash benchmarks/multi_gpu_session.sh two MODEL...   nvidia-h200-x2: the GPU tests (two-GPU ones included), then
#                                                       1 GPU / CP x2 / TP x2 rows of each MODEL (flux, wan), one
#                                                       torchrun per model; CP=ring for ring attention
# Rows merge into benchmarks/results/multi_gpu_h200.json, copied to $OUT after every step (copy it back into the
# tree between calls: the next call merges into the copy it carries).
what=${1:-one}; shift || true
source benchmarks/device_setup.sh
RES=benchmarks/results/multi_gpu_h200.json
save() { cp "$RES" "$OUT/" 2>/dev/null; true; }
tests() {
  timeout ${TEST_S:-240} python3 -m pytest -q -p no:cacheprovider tests/test_parallel.py tests/gpu/test_parallel_gpu.py \
    -o log_level=WARNING -rs 2>&1 | grep -v "^DEBUG" | tee "$OUT/parallel_tests.txt" | tail -15
}
case $what in
  one)
    tests
    for m in flux wan; do
      timeout 240 python3 benchmarks/multi_gpu.py --models $m --modes single --out $RES 2>&1 | grep -v Warning \
        | tee -a "$OUT/multi_gpu.txt"
      save
    done ;;
  two)
    nvidia-smi topo -m | tee "$OUT/topo.txt"
    [ -n "$SKIP_TESTS" ] || tests
    models=("$@"); [ ${#models[@]} -gt 0 ] || models=(flux wan)
    for m in "${models[@]}"; do
      timeout ${RUN_S:-400} python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/multi_gpu.py --models $m --cp ${CP:-ulysses} \
        --out $RES 2>&1 | grep -v "Warning\|W[0-9]\{4\}" | tee -a "$OUT/multi_gpu.txt"
      save
    done ;;
esac
save
date
