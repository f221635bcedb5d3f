#!/usr/bin/env bash
# The quality benchmark with FID / KID on a GPU machine reached through the `device` tool.
#
# One call may carry 64 MiB, but the shipped weights (40 MB), the fp16 Inception (44 MB) and Emoji-64 (36 MB)
# together are 120 MB, so the work is three calls to the same warm machine (ignored files written there stay
# between calls while it is warm; it is given back 30 s after a call):
#   1. tree without the weights + carry .cache/inception_fp16.pt          -> stays in .cache/ there
#   2. tree without the weights + carry .cache/emoji64.npz                 -> .cache/real_features.npz there
#   3. carry .qw (the weights), .qcarry (diffusers wheels + prompts_all.txt), the prebuilt kernel library
#      -> benchmarks/quality.py with FID / KID, results in $OUT
# Here, before the calls: mkdir .qw && mv rtlynx/assets/miniflux/*.safetensors .qw/ (put them back after).
#   run: bash benchmarks/fid_session.sh {inception|reference|quality|ablation} [N [NAME [quality.py options]]]
# (ablation: stage 3 with benchmarks/fid_ablation.py instead of quality.py)
set -uo pipefail
stage=${1:?stage: inception, reference or quality}
N=${2:-5000}
NAME=${3:-quality}
EXTRA=("${@:4}")
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
case $stage in
inception)
    ls -la .cache/ && python3 -c "import torch; print(torch.cuda.get_device_name(0))" ;;
reference)
    python3 - <<'PY'
import time, torch
from rtlynx.eval import fid as F
t = time.time()
net = F.load_inception(".cache/inception_fp16.pt", "cuda")
f = F.reference_features(net, ".cache/emoji64.npz", cache=".cache/real_features.npz")
print(f"reference features {f.shape} in {time.time() - t:.1f} s on {torch.cuda.get_device_name(0)}")
PY
    rm -f .cache/emoji64.npz ;;
quality|ablation)
    OUT=${OUT:-/tmp/out} WHEELS=.qcarry BUILD=0 source benchmarks/device_setup.sh  # no build: the newest prebuilt library, if any
    cp .qw/*.safetensors rtlynx/assets/miniflux/
    lib=$(ls -t .cache/build/librtlynx_sm90.*.so 2>/dev/null | head -1)  # the newest; the JSON records its sha256
    backend=reference
    [ -n "$lib" ] && export RTLYNX_LIB=$PWD/$lib && backend=lynx
    if [ $stage = ablation ]; then
        python3 benchmarks/fid_ablation.py --prompts-file .qcarry/prompts_all.txt --n "$N" --backend $backend \
            --inception .cache/inception_fp16.pt --reference-features .cache/real_features.npz \
            --out "${OUT:-/tmp/out}/fid_ablation.json" 2>&1 | tee "${OUT:-/tmp/out}/fid_ablation_log.txt"
        exit
    fi
    python3 benchmarks/quality.py --prompts-file .qcarry/prompts_all.txt --data none --n "$N" --batch-size 500 \
        --inception .cache/inception_fp16.pt --reference-features .cache/real_features.npz --backend $backend \
        --out "${OUT:-/tmp/out}/$NAME.json" "${EXTRA[@]}" 2>&1 | grep -v "it/s]" | tee "${OUT:-/tmp/out}/${NAME}_log.txt" ;;
*)
    echo "unknown stage $stage"; exit 2 ;;
esac
