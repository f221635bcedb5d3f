#!/bin/bash
# Compile-check the sm90 CUDA sources with nvcc, without torch (the kernels have a plain C ABI).
#   csrc/compile_check.sh              prune kernel, dispatch table and ONE sparse GEMM config (~3 min, 2 cores)
#   RTLYNX_CHECK_ALL=1 csrc/compile_check.sh   every .cu (each GEMM config TU: ~3 min of one core)
# CUTLASS headers: $CUTLASS_INCLUDE, else .cache/cutlass/include, else the installed nvidia-cutlass package.
# Prints ptxas register/spill usage and fails on any compile error, spill or local-memory stack frame in the
# prune kernel. Exit 0 = OK; 2 = skipped (no nvcc or no CUTLASS).
set -euo pipefail
cd "$(dirname "$0")"
NVCC=${RTLYNX_NVCC:-$(command -v nvcc || true)}
[[ -z $NVCC && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
if [[ -z $NVCC ]]; then echo "compile_check: no nvcc, skipped"; exit 2; fi
INC=${CUTLASS_INCLUDE:-}
[[ -z $INC && -d ../.cache/cutlass/include/cutlass ]] && INC=$(cd ../.cache/cutlass/include && pwd)
if [[ -z $INC ]]; then
  INC=$(python3 -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null || true)
fi
if [[ -z $INC || ! -d $INC/cutlass ]]; then echo "compile_check: CUTLASS headers not found, skipped"; exit 2; fi
UTIL=""
[[ -f $INC/cutlass/util/packed_stride.hpp ]] || UTIL="-I$INC/../tools/util/include"
FLAGS="-std=c++17 -O3 -DNDEBUG -DCUTLASS_ENABLE_GDC_FOR_SM90 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Xcompiler -fPIC -I$INC $UTIL -I. -Xptxas -v"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
srcs=(prune_compress_sm90.cu sparse_gemm_sm90_dispatch.cu sparse_gemm_fp8_sm90_dispatch.cu sparse_gemm_fp8_sm90_f8_t128x256x128_coop_c2x1.cu)
if [[ ${RTLYNX_CHECK_ALL:-0} == 1 ]]; then srcs+=(sparse_gemm_sm90_t*.cu sparse_gemm_fp8_sm90_f8_*.cu); else srcs+=(sparse_gemm_sm90_t128x128_coop_c2x1.cu); fi
pids=()
for s in "${srcs[@]}"; do
  ( $NVCC $FLAGS -c "$s" -o "$TMP/${s%.cu}.o" > "$TMP/${s%.cu}.log" 2>&1 || { echo "FAILED: $s"; cat "$TMP/${s%.cu}.log" | grep -v "^ptxas info" | tail -30; exit 1; } ) &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
for s in "${srcs[@]}"; do
  echo "== $s"; grep -E "Used [0-9]+ registers|spill" "$TMP/${s%.cu}.log" | sort | uniq -c | head -6 || true
done
if grep -q "[1-9][0-9]* bytes stack frame" "$TMP/prune_compress_sm90.log"; then echo "prune kernel uses local memory"; rc=1; fi
[[ $rc == 0 ]] && echo "compile_check: OK (${#srcs[@]} units)" || echo "compile_check: FAILED"
exit $rc
