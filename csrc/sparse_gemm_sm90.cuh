// CUTLASS 3.x Hopper structured-sparse GEMM (wgmma.sp) with the RT-Lynx epilogue:
//   D[m, n] = s[m] * acc[m, n] + bias[n]       (s: fp32 per token, bias: per output feature)
// One template, instantiated per (config, dtype) in sparse_gemm_sm90_<cfg>.cu so builds run in parallel.
#pragma once
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "rtlynx_sm90.h"

namespace rtlynx {

using namespace cute;

// Tile K is fixed at 128 logical elements for every config: the metadata layout (LayoutE atom 64 x 128)
// depends on min(tile K, 128), and the prune kernel writes exactly that one layout.
template <class Element, class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule>
struct SparseGemmSm90 {
  static_assert(size<2>(TileShape{}) == 128, "tile K must be 128 (metadata layout)");
  using ElementA = Element;
  using ElementB = Element;
  using ElementD = Element;
  using ElementAcc = float;
  using ElementCompute = float;
  using LayoutTagA = cutlass::layout::RowMajor;     // X~ [M, K], K contiguous
  using LayoutTagB = cutlass::layout::ColumnMajor;  // W [N, K], K contiguous
  using LayoutTagD = cutlass::layout::RowMajor;     // Y [M, N]
  static constexpr int AlignA = 128 / cutlass::sizeof_bits<ElementA>::value;
  static constexpr int AlignB = 128 / cutlass::sizeof_bits<ElementB>::value;
  static constexpr int AlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  static constexpr auto RoundStyle = cutlass::FloatRoundStyle::round_to_nearest;

  using namespace_fusion_dummy = void;
  // s[m]: column vector broadcast along N (null -> 1). bias[n]: row vector broadcast along M (null -> 0).
  using ScaleCol = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, ElementCompute,
                                                               Stride<_1, _0, int64_t>>;
  using BiasRow = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementD, ElementCompute,
                                                              Stride<_0, _1, int64_t>>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using FMA = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiply_add, ElementD, ElementCompute, RoundStyle>;
  using EVT = cutlass::epilogue::fusion::Sm90EVT<FMA, ScaleCol, Acc, BiasRow>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, LayoutTagD, AlignD,          // no C operand
      ElementD, LayoutTagD, AlignD,
      EpilogueSchedule, EVT>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      ElementA, LayoutTagA, AlignA,
      ElementB, LayoutTagB, AlignB,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using ProblemShape = Shape<int, int, int, int>;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using StrideB = typename GemmKernel::StrideB;
  using StrideD = typename GemmKernel::StrideD;

  static int sm_count() {
    static int n = 0;
    if (n == 0) {
      int dev = 0;
      cudaGetDevice(&dev);
      n = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(dev);
    }
    return n;
  }

  static int run(const void* values, long ldv, const void* meta, const void* w, long ldw, void* y, long ldy,
                 const float* scale, const void* bias, int M, int N, int Kg, int sched, cudaStream_t stream) {
    if (M <= 0 || N <= 0 || Kg <= 0 || Kg % 128 != 0) return RTLYNX_ERR_ARGS;
    // A and D are packed; W may have a row stride ldw >= Kg (a site's [W | B-expanded] used without its LoRA tail).
    if (ldv != Kg / 2 || ldw < Kg || ldw % 8 != 0 || ldy != N) return RTLYNX_ERR_ARGS;
    auto problem = ProblemShape{M, N, Kg, 1};
    auto layout_a = SparseConfig::fill_layoutA(problem);
    auto layout_e = SparseConfig::fill_layoutE(problem);
    auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, Kg, 1));
    cute::get<0>(stride_b) = ldw;  // N-stride of the K-major W
    auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));

    cutlass::KernelHardwareInfo hw;
    cudaGetDevice(&hw.device_id);
    hw.sm_count = sm_count();

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        problem,
        {static_cast<const ElementA*>(values), layout_a, static_cast<const ElementB*>(w), stride_b,
         static_cast<const typename CollectiveMainloop::ElementE*>(meta), layout_e},
        {{}, nullptr, stride_d, static_cast<ElementD*>(y), stride_d},
        hw};
    // EVT arguments: {scale col, acc, bias row, fma}
    args.epilogue.thread = {
        {scale, 1.0f, {_1{}, _0{}, int64_t(0)}},
        {},
        {static_cast<const ElementD*>(bias), ElementD(0), {_0{}, _1{}, int64_t(0)}},
        {}};

    // sched = max_swizzle_size (low byte, 0 -> 1) | raster order << 8 (0 heuristic, 1 along M, 2 along N)
    //         | 1 << 16: launch with programmatic dependent launch (PDL)
    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    args.scheduler.max_swizzle_size = (sched & 0xff) ? (sched & 0xff) : 1;
    int raster = (sched >> 8) & 0xff;
    args.scheduler.raster_order = raster == 1 ? Raster::AlongM : raster == 2 ? Raster::AlongN : Raster::Heuristic;

    Gemm gemm;
    if (Gemm::get_workspace_size(args) != 0) return RTLYNX_ERR_WORKSPACE;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return RTLYNX_ERR_CANNOT_IMPL;
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return RTLYNX_ERR_INIT;
    // PDL: with CUTLASS_ENABLE_GDC_FOR_SM90 the producer warps wait (griddepcontrol.wait) before their first
    // global read and every other global access is causally after that, so launching the GEMM as a
    // programmatic dependent of the prune kernel only overlaps its prologue with the prune's tail.
    const bool pdl = (sched >> 16) & 1;
    if (gemm.run(stream, nullptr, pdl) != cutlass::Status::kSuccess) {
      cudaError_t e = cudaGetLastError();
      return e != cudaSuccess ? int(e) : RTLYNX_ERR_RUN;
    }
    cudaError_t e = cudaGetLastError();
    return e != cudaSuccess ? int(e) : 0;
  }

  static int smem_bytes() { return int(sizeof(typename GemmKernel::SharedStorage)); }
  static int stages() { return CollectiveMainloop::DispatchPolicy::Stages; }
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
