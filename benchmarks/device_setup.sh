# Sourced by every device session script (benchmarks/*_session.sh): the set-up each device call needs, in one place.
# Carry the wheels in .whl (diffusers + importlib_metadata, torchao for the FP8 recipe; WHEELS=DIR: another folder,
# WHEELS=none: none), the CUTLASS headers as .cache/cutlass/include or packed as .cache/cutlass_inc.tar.xz (1 MB
# instead of 28), and optionally .cache/build or .cache/obj.tgz (kernel objects prebuilt elsewhere). BUILD=0: no
# kernel build (the reference path, or the library an earlier call's quality_global_session.sh prep built, named in
# .cache/lib.txt; with WHEELS=none PYTHONPATH=$PWD/.cache/site that call's wheels too: no carry of either).
# Sets OUT, PYTHONPATH, RTLYNX_BUILD_DIR, CUTLASS_INCLUDE and (with the build) RTLYNX_LIB, the library it builds or
# finds; writes $OUT/env.txt and, with the build, $OUT/build.txt; KEEP_OBJ=1 also $OUT/obj.tgz (the objects, one
# file: only when they were compiled here, since $OUT gives back 8 files at most and device_files.sh OBJECTS=1 makes
# them on the CPU).
set -o pipefail
OUT=${OUT:-/tmp/rtlynx_out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if [ "$WHEELS" != none ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
fi
# the caller's PYTHONPATH stays behind ours (WHEELS=none after another script installed the wheels elsewhere, e.g.
# quality_global_session.sh's .cache/site: replacing it lost diffusers in the 2026-12-07 adapter run)
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg MAX_JOBS=${MAX_JOBS:-16}
export RTLYNX_BUILD_DIR=${RTLYNX_BUILD_DIR:-$PWD/.cache/build}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/env.txt"
if [ "${BUILD:-1}" = 0 ] && [ -z "${RTLYNX_LIB:-}" ] && [ -f .cache/lib.txt ] && [ -f "$(cat .cache/lib.txt)" ]; then
  export RTLYNX_LIB=$(cat .cache/lib.txt)  # the library quality_global_session.sh prep built (and tested) earlier
fi
if [ "${BUILD:-1}" != 0 ]; then
  # prebuilt objects may come packed (.cache/obj.tgz, the obj.tgz an earlier call wrote): a third of the size
  if [ -f .cache/obj.tgz ]; then mkdir -p "$RTLYNX_BUILD_DIR" && tar xzf .cache/obj.tgz -C "$RTLYNX_BUILD_DIR"; fi
  [ -f .cache/cutlass_inc.tar.xz ] && mkdir -p /tmp/cutlass && tar xJf .cache/cutlass_inc.tar.xz -C /tmp/cutlass
  export CUTLASS_INCLUDE=${CUTLASS_INCLUDE:-$PWD/.cache/cutlass/include}
  [ -d "$CUTLASS_INCLUDE" ] || CUTLASS_INCLUDE=/tmp/cutlass/include
  t0=$(date +%s)
  python3 -m rtlynx.ops._build 2>&1 | tail -3 | tee "$OUT/build.txt" || { echo BUILD FAILED; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"
  export RTLYNX_LIB=$(grep '\.so$' "$OUT/build.txt" | tail -1)
  [ -f "$RTLYNX_LIB" ] || { echo "no library"; cat "$OUT/build.txt"; exit 1; }
  if [ "${KEEP_OBJ:-0}" = 1 ]; then  # for later calls (one file: copy-back limits count)
    tar czf "$OUT/obj.tgz" -C "$RTLYNX_BUILD_DIR" obj 2>/dev/null
  fi
fi
build_sage2() {  # SageAttention 2 from .cache/sage2_src.tgz (device_files.sh SAGE2=) into /tmp/site, timed; SAGE_S
  [ -f .cache/sage2_src.tgz ] || { echo "sage2: no .cache/sage2_src.tgz (device_files.sh SAGE2=)"; return 1; }
  rm -rf /tmp/sage2 && tar xzf .cache/sage2_src.tgz -C /tmp
  local t0 rc; t0=$(date +%s)
  (cd /tmp/sage2 && TORCH_CUDA_ARCH_LIST=9.0 timeout "${SAGE_S:-420}" python3 -m pip install --no-build-isolation \
    --no-deps --no-index --upgrade --target /tmp/site .) > "$OUT/sage2_build.txt" 2>&1
  rc=$?
  echo "sage2 build rc $rc in $(( $(date +%s) - t0 )) s, source $(cat /tmp/sage2/COMMIT)" | tee -a "$OUT/sage2_build.txt"
  return $rc
}
