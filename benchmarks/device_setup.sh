# Sourced by the device session scripts (benchmarks/*_session.sh): the set-up every device call needs.
# Carry .whl (diffusers + importlib_metadata, torchao for the FP8 recipe), the CUTLASS headers as
# .cache/cutlass/include or packed as .cache/cutlass_inc.tar.xz (1 MB instead of 28), and optionally .cache/build
# or .cache/obj.tgz (kernel objects prebuilt elsewhere). Sets OUT, PYTHONPATH, RTLYNX_BUILD_DIR, CUTLASS_INCLUDE and RTLYNX_LIB (the
# library it builds or finds), writes $OUT/env.txt, $OUT/build.txt and $OUT/obj.tgz (the objects, one file).
set -o pipefail
OUT=${OUT:-/tmp/rtlynx_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MAX_JOBS=16
export RTLYNX_BUILD_DIR=$PWD/.cache/build
# prebuilt objects may come packed (.cache/obj.tgz, the obj.tgz an earlier call wrote): a third of the size
if [ -f .cache/obj.tgz ]; then mkdir -p .cache/build && tar xzf .cache/obj.tgz -C .cache/build; fi
if [ -f .cache/cutlass_inc.tar.xz ]; then mkdir -p /tmp/cutlass && tar xJf .cache/cutlass_inc.tar.xz -C /tmp/cutlass; fi
export CUTLASS_INCLUDE=$PWD/.cache/cutlass/include; [ -d "$CUTLASS_INCLUDE" ] || CUTLASS_INCLUDE=/tmp/cutlass/include
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv | tee "$OUT/env.txt"
t0=$(date +%s)
python3 -m rtlynx.ops._build 2>&1 | tail -3 | tee "$OUT/build.txt" || { echo BUILD FAILED; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"
export RTLYNX_LIB=$(grep '\.so$' "$OUT/build.txt" | tail -1)
[ -f "$RTLYNX_LIB" ] || { echo "no library"; cat "$OUT/build.txt"; exit 1; }
tar czf "$OUT/obj.tgz" -C .cache/build obj 2>/dev/null  # objects for later calls (one file: the copy-back limits count)
