#!/usr/bin/env bash
# One device call (H100): distil the mini-FLUX LoRA (rank sweep), then the demo, the per-layer analysis and
# the quality benchmark, everything tarred into $OUT/quality_results.tgz.
# Carry: .qcarry (diffusers wheels + prompt lists made from Emoji-64; see benchmarks/NOTES_quality.md).
#   run: bash benchmarks/quality_session.sh [RANK] [N]
set -uo pipefail
OUT=${OUT:-/tmp/out}
WHEELS=.qcarry BUILD=0 source benchmarks/device_setup.sh  # the reference path: no kernel build
if [ "${1:-}" = lynx ]; then
    python3 -m rtlynx info
    python3 -m pytest -q -p no:cacheprovider tests/test_lynx_integration.py tests/test_backends_cuda.py 2>&1 | tail -15
    N=${N:-500} python3 - <<'PY'
import time, torch, rtlynx
from rtlynx import demo
from rtlynx.models.miniflux import load_miniflux
from rtlynx.eval.fid import psnr
from rtlynx.models.miniflux import to_uint8
m = load_miniflux(device="cuda", dtype=torch.bfloat16); demo.prepare(m, backend="lynx")
p = demo.DEMO_PROMPTS * 8
out = {}
for be in ("reference", "lynx"):
    rtlynx.configure(m.transformer, backend=be); m.sample(p[:8], num_steps=2)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    out[be] = to_uint8(m.sample(p, num_steps=20, seed=0)); torch.cuda.synchronize()
    print(f"{be}: {time.perf_counter() - t0:.2f} s for {len(p)} images (20 steps)")
rtlynx.configure(m.transformer, mode="dense"); torch.cuda.synchronize(); t0 = time.perf_counter()
d = to_uint8(m.sample(p, num_steps=20, seed=0)); torch.cuda.synchronize()
print(f"dense: {time.perf_counter() - t0:.2f} s")
print("PSNR lynx vs reference backend:", float(psnr(out["lynx"], out["reference"]).mean()),
      "| lynx vs dense:", float(psnr(out["lynx"], d).mean()), "| reference vs dense:", float(psnr(out["reference"], d).mean()))
PY
    exit 0
fi
RANK=${1:-8}
N=${2:-2000}
C=.qcarry
W=/tmp/rtlynx-quality
mkdir -p "$W"
log() { echo "== $(date +%T) $*"; }
{
log "core tests on this machine's torch (CUDA backends + reference math + diffusers integration)"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
python -m pytest -q -p no:cacheprovider tests/test_backends_cuda.py tests/test_reference.py tests/test_nn.py \
    tests/test_api.py --tb=line 2>&1 | grep -E "passed|failed|values differ|Error" | cut -c1-400 | tail -12
log calibrate
python -m rtlynx calibrate --prompts-file $C/prompts_calib.txt --num-prompts ${NCAL:-512} --batch-size 256 --steps 20 \
    --out $W/calib.safetensors --overwrite
python -m rtlynx calibrate --prompts-file $C/prompts_val.txt --num-prompts 128 --batch-size 128 --steps 20 --seed 1 \
    --out $W/val.safetensors --overwrite
for r in ${RANKS:-8 32}; do
    log "train-lora rank $r"
    python -m rtlynx train-lora --calib $W/calib.safetensors --val $W/val.safetensors --rank $r --out $W/lora_r$r --overwrite
done
tar czf "$OUT/lora.tgz" -C $W $(cd $W && ls -d lora_r*)
log demo
python -m rtlynx demo --lora-dir $W/lora_r$RANK --out $W/demo --overwrite
cp $W/demo/sheet.png "$OUT/demo_sheet.png"; cp $W/demo/metrics.json "$OUT/demo_metrics.json"
for r in ${RANKS:-8 32}; do [ "$r" = "$RANK" ] && continue; log "demo rank $r"; python -m rtlynx demo --lora-dir $W/lora_r$r --out $W/demo_r$r --overwrite 2>&1 | grep -A6 "^variant"; done
log analyze
python -m rtlynx analyze --model miniflux --out $W/analysis --batches 1
cp $W/analysis/layer_errors.png $W/analysis/layer_errors.csv "$OUT/" 2>/dev/null
log quality
python benchmarks/quality.py --prompts-file $C/prompts_all.txt --data none --n "$N" --lora-dir $W/lora_r$RANK \
    --out $W/quality.json
cp $W/quality.json $W/quality_sheet.png "$OUT/" 2>/dev/null
log done
} 2>&1 | tee "$OUT/quality_log.txt"
ls -la "$OUT"
# Lynx integration (Hopper): SparseActLinear and the mini-FLUX on the fused kernels vs the reference path.
#   RTLYNX_LIB=.cache/build/librtlynx_sm90.<hash>.so bash benchmarks/quality_session.sh lynx
