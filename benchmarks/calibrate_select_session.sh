#!/bin/bash
# One device call measuring calibration memory and `rtlynx select`'s speed table (issue 10; ~4 minutes on an H200;
# carry .whl with the diffusers wheel, and .cache as for benchmarks/e2e_session.sh so the lynx kernels need no
# rebuild):
#   bash benchmarks/calibrate_select_session.sh
# 1. full-size FLUX.1-dev calibration: peak memory and s/prompt per pass, one pass and --max-stats-gb 40
#    (benchmarks/calibrate_memory.py -> benchmarks/results/calibrate_memory_h200.json)
# 2. the speed table of `rtlynx select` for this GPU at the site shapes of FLUX / Qwen-Image / Z-Image /
#    PixArt-Sigma / SD3.5, and each model's fast-site set against dense (benchmarks/select_speed.py ->
#    benchmarks/results/speed_table_h200.json, select_speed_h200.json)
# Everything lands in benchmarks/results/ and is copied to $OUT.
source benchmarks/device_setup.sh
save() { cp benchmarks/results/calibrate_memory_*.json benchmarks/results/speed_table_*.json \
  benchmarks/results/select_speed_*.json "$OUT/" 2>/dev/null; true; }
echo "== $(date +%T) calibration memory / time, full-size FLUX.1-dev"
timeout 100 python3 benchmarks/calibrate_memory.py --model flux --max-stats-gb 0 40 --prompts 2 --steps 4 2>&1 \
  | grep -v Warning | tee "$OUT/calibrate_memory.txt"
save
echo "== $(date +%T) speed table + fast sites vs dense"
timeout 150 python3 benchmarks/select_speed.py --models flux z-image qwen-image pixart-sigma sd35 --reps 10 2>&1 \
  | grep -v Warning | tee "$OUT/select_speed.txt"
save
echo "== $(date +%T) done"
