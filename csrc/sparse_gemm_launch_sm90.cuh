// The one host launcher of the Hopper structured-sparse GEMMs (wgmma.sp), shared by the bf16 / fp16 and the FP8
// kernels: they differ only in the operand and output types and in the epilogue tree (EVT), so the CUTLASS collective
// builders, the problem layouts (A~ and its metadata E from SparseConfig, W with a row stride), the scheduler options
// and the launch live here once. sparse_gemm_sm90.cuh and sparse_gemm_fp8_sm90.cuh define the epilogues and check
// their arguments.
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

// Epilogue leaves shared by both families: an fp32 value per token (row m, broadcast along N), an fp32 value per
// output feature (column n, broadcast along M) and the bias (per output feature, in the output type).
template <class TileShape>
using PerToken = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
template <class TileShape>
using PerFeature = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
template <class TileShape, class ElementD>
using BiasRow = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementD, float, Stride<_0, _1, int64_t>>;
using AccFetch = cutlass::epilogue::fusion::Sm90AccFetch;
template <template <class> class Op, class ElementOut>
using Compute = cutlass::epilogue::fusion::Sm90Compute<Op, ElementOut, float, cutlass::FloatRoundStyle::round_to_nearest>;

inline int sm_count() {
  static int n = 0;
  if (n == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    n = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(dev);
  }
  return n;
}

// A~ [M, Kg] (2:4 values + metadata, K contiguous) times W [N, Kg] (K contiguous, row stride ldw) -> D [M, N] row-major,
// fp32 accumulation, the epilogue tree EVT on the accumulator. No C operand and no workspace.
template <class ElementAB, class ElementD_, class EVT, class TileShape, class ClusterShape, class MainloopSchedule,
          class EpilogueSchedule>
struct SparseGemmKernel {
  using ElementD = ElementD_;
  using LayoutTagA = cutlass::layout::RowMajor;     // X~ [M, K], K contiguous
  using LayoutTagB = cutlass::layout::ColumnMajor;  // W [N, K], K contiguous
  using LayoutTagD = cutlass::layout::RowMajor;     // Y [M, N]
  static constexpr int AlignAB = 128 / cutlass::sizeof_bits<ElementAB>::value;
  static constexpr int AlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutTagD, AlignD,  // no C operand
      ElementD, LayoutTagD, AlignD,
      EpilogueSchedule, EVT>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      ElementAB, LayoutTagA, AlignAB,
      ElementAB, LayoutTagB, AlignAB,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using ProblemShape = Shape<int, int, int, int>;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using StrideB = typename GemmKernel::StrideB;
  using StrideD = typename GemmKernel::StrideD;

  // fill_epilogue(args.epilogue.thread) sets the EVT's arguments (pointers of the broadcast leaves).
  // sched = max_swizzle_size (low byte, 0 -> 1) | raster order << 8 (0 heuristic, 1 along M, 2 along N)
  //         | 1 << 16: launch with programmatic dependent launch (PDL)
  template <class FillEpilogue>
  static int run(const void* values, const void* meta, const void* w, long ldw, void* y, int M, int N, int Kg,
                 int sched, cudaStream_t stream, FillEpilogue fill_epilogue) {
    auto problem = ProblemShape{M, N, Kg, 1};
    auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, Kg, 1));
    cute::get<0>(stride_b) = ldw;  // N-stride of the K-major W
    auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));

    cutlass::KernelHardwareInfo hw;
    cudaGetDevice(&hw.device_id);
    hw.sm_count = sm_count();

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        problem,
        {static_cast<const ElementAB*>(values), SparseConfig::fill_layoutA(problem), static_cast<const ElementAB*>(w),
         stride_b, static_cast<const typename CollectiveMainloop::ElementE*>(meta), SparseConfig::fill_layoutE(problem)},
        {{}, nullptr, stride_d, static_cast<ElementD*>(y), stride_d},
        hw};
    fill_epilogue(args.epilogue.thread);

    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    args.scheduler.max_swizzle_size = (sched & 0xff) ? (sched & 0xff) : 1;
    const int raster = (sched >> 8) & 0xff;
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
