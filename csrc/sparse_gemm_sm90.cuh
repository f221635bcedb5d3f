// CUTLASS 3.x Hopper structured-sparse GEMM (wgmma.sp) with the RT-Lynx epilogue:
//   D[m, n] = s[m] * acc[m, n] + bias[n]       (s: fp32 per token, bias: per output feature)
// One template, instantiated per (config, dtype) in sparse_gemm_sm90_<cfg>.cu so builds run in parallel.
#pragma once
#include "sparse_gemm_launch_sm90.cuh"

namespace rtlynx {

// Tile K is fixed at 128 logical elements for every config: the metadata layout (LayoutE atom 64 x 128)
// depends on min(tile K, 128), and the prune kernel writes exactly that one layout.
template <class Element, class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule>
struct SparseGemmSm90 {
  static_assert(size<2>(TileShape{}) == 128, "tile K must be 128 (metadata layout)");
  // s[m] * acc + bias[n] (s null -> 1, bias null -> 0)
  using EVT = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::multiply_add, Element>, PerToken<TileShape>,
                                                 AccFetch, BiasRow<TileShape, Element>>;
  using Kernel = SparseGemmKernel<Element, Element, EVT, TileShape, ClusterShape, MainloopSchedule, EpilogueSchedule>;

  static int run(const void* values, long ldv, const void* meta, const void* w, long ldw, void* y, long ldy,
                 const float* scale, const void* bias, int M, int N, int Kg, int sched, cudaStream_t stream) {
    if (M <= 0 || N <= 0 || Kg <= 0 || Kg % 128 != 0) return RTLYNX_ERR_ARGS;
    // A and D are packed; W may have a row stride ldw >= Kg (a site's [W | B-expanded] used without its LoRA tail).
    if (ldv != Kg / 2 || ldw < Kg || ldw % 8 != 0 || ldy != N) return RTLYNX_ERR_ARGS;
    return Kernel::run(values, meta, w, ldw, y, M, N, Kg, sched, stream, [&](auto& thread) {
      // EVT arguments: {scale col, acc, bias row, fma}
      thread = {{scale, 1.0f, {_1{}, _0{}, int64_t(0)}},
                {},
                {static_cast<const Element*>(bias), Element(0), {_0{}, _1{}, int64_t(0)}},
                {}};
    });
  }

  static int smem_bytes() { return Kernel::smem_bytes(); }
  static int stages() { return Kernel::stages(); }
};

}  // namespace rtlynx

// Defines extern "C" rtlynx_sgemm_sm90_<NAME>_{bf16,fp16}(...) and _info for one config.
#define RTLYNX_DEFINE_SGEMM_CONFIG(NAME, TILE, CLUSTER, MAINLOOP, EPILOGUE)                                   \
  namespace {                                                                                                 \
  template <class E>                                                                                          \
  using Cfg_##NAME = rtlynx::SparseGemmSm90<E, TILE, CLUSTER, MAINLOOP, EPILOGUE>;                           \
  }                                                                                                           \
  extern "C" int rtlynx_sgemm_sm90_##NAME(int dtype, const void* v, long ldv, const void* e, const void* w,   \
                                          long ldw, void* y, long ldy, const float* s, const void* b, int M,  \
                                          int N, int K, int sched, void* stream) {                            \
    cudaStream_t st = static_cast<cudaStream_t>(stream);                                                      \
    if (dtype == RTLYNX_BF16)                                                                                 \
      return Cfg_##NAME<cutlass::bfloat16_t>::run(v, ldv, e, w, ldw, y, ldy, s, b, M, N, K, sched, st);              \
    if (dtype == RTLYNX_FP16)                                                                                 \
      return Cfg_##NAME<cutlass::half_t>::run(v, ldv, e, w, ldw, y, ldy, s, b, M, N, K, sched, st);                  \
    return RTLYNX_ERR_CONFIG;                                                                                 \
  }                                                                                                           \
  extern "C" int rtlynx_sgemm_sm90_##NAME##_info(int* smem, int* stages) {                                    \
    *smem = Cfg_##NAME<cutlass::bfloat16_t>::smem_bytes();                                                    \
    *stages = Cfg_##NAME<cutlass::bfloat16_t>::stages();                                                      \
    return 0;                                                                                                 \
  }
