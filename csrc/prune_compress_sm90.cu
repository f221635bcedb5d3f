// Online 2:4 prune + compress of activations for the Hopper sparse GEMM, plus the per-token norm scale.
//
// One pass over X: every thread owns 16-element runs of a row (32 bytes in, 16 bytes of values and one
// 16-bit metadata word out per run); kRow threads own a row (8..128, picked per shape so that small M still
// fills the GPU), the |x|^2 / |x~|^2 row sums reduce with shuffles (+ shared memory across warps) and s is
// written in the same pass.
//
// Selection rule (== rtlynx.reference.nm): keep the 2 largest |x| of each group of 4, NaN ranks as +inf,
// ties go to the lower index, kept values in index order. Metadata nibble per group: idx0 | idx1 << 2.
//
// Producer fusion (kAct = 1, rtlynx_gelu_prune_compress_sm90): the loaded run is the MLP pre-activation H; every
// element goes through GELU-tanh in fp32 (torch's CUDA expression, see gelu_tanh_bits) and is rounded to the dtype
// before the selection, so the pass reads H once and emits the compressed GELU output (optionally also the
// dense GELU output, for a LoRA branch) instead of a GELU pass + a prune pass.
//
// Token-mean centring (kCentre, the *_centred entry points; rtlynx.reference.nm.centred / centre_rows): rows m < Mt
// are x[m] - cvec[m / per] (the loaded 16-bit value minus a float32 centre, one IEEE subtraction, rounded once to the
// dtype) before the selection; rows Mt .. Mt+R-1 are crows (the centre's own 2:4-exact rows) as given. So the site GEMM
// sees [x - c; crows] without x - c or the concatenation ever being written.
//
// sm90 metadata layout (CUTLASS Sm90GemmSparseConfig, 16-bit A, tile K 128): in units of 16-bit words
// (one word = the 4 nibbles of 16 consecutive logical elements of a row), for row m and word column
// kw = k / 16:  m = m0 + 8 m1 + 16 m2 + 64 ma,  kw = k1 + 2 k2 + 8 ka  (m0<8, m1<2, m2<4, k1<2, k2<4)
//   word = m1 + 2 k2 + 8 m0 + 64 k1 + 128 m2 + 512 ma + 512 (Mp/64) ka
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "rtlynx_sm90.h"

#define RTLYNX_API __attribute__((visibility("default")))

namespace {

constexpr int kThreads = 128;

template <class T>
struct Traits;
template <>
struct Traits<__nv_bfloat16> {
  static constexpr uint16_t kInf = 0x7F80;
  __device__ static float to_float(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
  __device__ static uint16_t from_float(float f) {
    __nv_bfloat16 h = __float2bfloat16_rn(f);
    return *reinterpret_cast<uint16_t*>(&h);
  }
};
template <>
struct Traits<__half> {
  static constexpr uint16_t kInf = 0x7C00;
  __device__ static float to_float(uint16_t b) {
    __half h = *reinterpret_cast<__half*>(&b);
    return __half2float(h);
  }
  __device__ static uint16_t from_float(float f) {
    __half h = __float2half_rn(f);
    return *reinterpret_cast<uint16_t*>(&h);
  }
};

// GELU with the tanh approximation on one 16-bit encoding, exactly as torch's CUDA kernel computes it for
// F.gelu(h, approximate="tanh") (ATen GeluCUDAKernelImpl: opmath float, tanhf, result rounded once to the dtype).
// nvcc contracts torch's `x + kKappa * x_cube` into one FMA (default -fmad=true); the intrinsics pin that here and
// keep every other operation a separately rounded fp32 multiply / add, as in torch's expression.
template <class T>
__device__ __forceinline__ uint16_t gelu_tanh_bits(uint16_t b) {
  constexpr float kBeta = float(1.41421356237309504880 * 1.12837916709551257390 * 0.5);  // M_SQRT2*M_2_SQRTPI*0.5
  constexpr float kKappa = 0.044715f;
  const float x = Traits<T>::to_float(b);
  const float x_cube = __fmul_rn(__fmul_rn(x, x), x);
  const float inner = __fmul_rn(kBeta, __fmaf_rn(kKappa, x_cube, x));
  const float g = __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, tanhf(inner)));
  return Traits<T>::from_float(g);
}

__device__ __forceinline__ long meta_word_index(int m, int kw, int mtiles) {
  int m0 = m & 7, m1 = (m >> 3) & 1, m2 = (m >> 4) & 3, ma = m >> 6;
  int k1 = kw & 1, k2 = (kw >> 1) & 3, ka = kw >> 3;
  return long(m1 + 2 * k2 + 8 * m0 + 64 * k1 + 128 * m2) + 512L * ma + 512L * mtiles * ka;
}

// Select 2 of 4 (16-bit encodings e[0..3]). Returns nibble idx0 | idx1 << 2 and the kept encodings.
template <class T>
__device__ __forceinline__ uint32_t select24(const uint16_t e[4], uint16_t& v0, uint16_t& v1) {
  uint16_t k[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint16_t a = e[i] & 0x7FFF;
    k[i] = a > Traits<T>::kInf ? Traits<T>::kInf : a;  // NaN -> +inf
  }
  // rank_i = #{j > i: k_j > k_i} + #{j < i: k_j >= k_i}; keep rank < 2
  uint32_t keep = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int rank = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < i) rank += (k[j] >= k[i]);
      if (j > i) rank += (k[j] > k[i]);
    }
    keep |= (rank < 2 ? 1u : 0u) << i;
  }
  uint32_t i0 = __ffs(keep) - 1;
  uint32_t i1 = 31 - __clz(keep);
  // constant-index selects: a run-time index would put the run in local memory
  v0 = i0 == 0 ? e[0] : (i0 == 1 ? e[1] : e[2]);
  v1 = i1 == 3 ? e[3] : (i1 == 2 ? e[2] : e[1]);
  return i0 | (i1 << 2);
}

// v3 selection: make the 4 keys distinct by appending the inverted index (lower index wins ties), then
// keep the keys >= the second largest (a 5-op max/min network instead of 12 pairwise rank comparisons).
template <class T>
__device__ __forceinline__ uint32_t select24_fast(const uint16_t e[4], uint16_t& v0, uint16_t& v1) {
  uint32_t u[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t a = e[i] & 0x7FFFu;
    a = a > Traits<T>::kInf ? Traits<T>::kInf : a;  // NaN -> +inf
    u[i] = (a << 2) | uint32_t(3 - i);
  }
  const uint32_t hi01 = max(u[0], u[1]), lo01 = min(u[0], u[1]);
  const uint32_t hi23 = max(u[2], u[3]), lo23 = min(u[2], u[3]);
  const uint32_t second = max(min(hi01, hi23), max(lo01, lo23));
  const uint32_t keep = uint32_t(u[0] >= second) | uint32_t(u[1] >= second) << 1 | uint32_t(u[2] >= second) << 2 |
                        uint32_t(u[3] >= second) << 3;
  uint32_t i0 = __ffs(keep) - 1;
  uint32_t i1 = 31 - __clz(keep);
  v0 = i0 == 0 ? e[0] : (i0 == 1 ? e[1] : e[2]);
  v1 = i1 == 3 ? e[3] : (i1 == 2 ? e[2] : e[1]);
  return i0 | (i1 << 2);
}

// One 16-element run: 8 kept values (packed 16-bit), meta word, and sum of squares (all, kept) of the values times
// inv_p (1 on the main pass, an exact power of two on the overflow pass below).
template <class T, bool kFast>
__device__ __forceinline__ void process_run(const uint4 in[2], uint4& out, uint16_t& word, float& sx, float& sp,
                                            float inv_p = 1.0f) {
  const uint16_t* e = reinterpret_cast<const uint16_t*>(in);
  uint16_t* o = reinterpret_cast<uint16_t*>(&out);
  uint32_t w = 0;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    uint16_t v0, v1;
    uint32_t nib = kFast ? select24_fast<T>(e + 4 * g, v0, v1) : select24<T>(e + 4 * g, v0, v1);
    w |= nib << (4 * g);
    o[2 * g] = v0;
    o[2 * g + 1] = v1;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float f = Traits<T>::to_float(e[4 * g + i]) * inv_p;
      sx = fmaf(f, f, sx);
    }
    float f0 = Traits<T>::to_float(v0) * inv_p, f1 = Traits<T>::to_float(v1) * inv_p;
    sp = fmaf(f0, f0, sp);
    sp = fmaf(f1, f1, sp);
  }
  word = uint16_t(w);
}

// Run c (16 logical elements at k = 16 c) of row xr, zero padded past K (K % 8 == 0: a tail run may be half valid);
// nothing is read unless ok (the row exists and c is below the padded run count).
__device__ __forceinline__ void load_run(const uint16_t* xr, int K, int c, bool ok, uint4 (&in)[2]) {
  const int k = c * 16;
  in[0] = make_uint4(0, 0, 0, 0);
  in[1] = make_uint4(0, 0, 0, 0);
  if (ok && k < K) {
    in[0] = __ldg(reinterpret_cast<const uint4*>(xr + k));
    if (k + 16 <= K) in[1] = __ldg(reinterpret_cast<const uint4*>(xr + k + 8));
  }
}

// The producer fusion: GELU-tanh on every element of a loaded run, in place (padding: GELU(0) = +0, a zero group).
template <class T>
__device__ __forceinline__ void gelu_run(uint4 (&in)[2]) {
  uint16_t* e = reinterpret_cast<uint16_t*>(in);
#pragma unroll
  for (int i = 0; i < 16; ++i) e[i] = gelu_tanh_bits<T>(e[i]);
}

// kCentre's operands (see the top of the file); unused without it.
struct Centre {
  const float* cvec = nullptr;     // [rows of x / per, ldc] float32 centres
  long ldc = 0;
  int per = 1;                     // token rows per centre
  const uint16_t* crows = nullptr; // [R, ldcr] rows appended after the Mt token rows
  long ldcr = 0;
  int Mt = 0;                      // token rows (the rest of the M rows come from crows)
};

// Row m's source: its 16-bit row and, for a centred token row, its float32 centre (else nullptr).
template <bool kCentre>
__device__ __forceinline__ const uint16_t* row_source(const uint16_t* x, long ldx, int m, const Centre& cen,
                                                      const float*& cr) {
  cr = nullptr;
  if constexpr (kCentre) {
    if (m >= cen.Mt) return cen.crows + long(m - cen.Mt) * cen.ldcr;
    cr = cen.cvec + long(m / cen.per) * cen.ldc;
  }
  return x + long(m) * ldx;
}

// Subtract the centre from a loaded run, in fp32, rounded once (== (x.float() - c).to(dtype)); padding stays 0.
template <class T>
__device__ __forceinline__ void centre_run(uint4 (&in)[2], const float* cr, int K, int c) {
  if (cr == nullptr) return;
  const int k = c * 16;
  // eight at a time (fewer live registers); K % 8 == 0: a half run is all valid or all padding (0 - 0 stays +0)
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (k + 8 * half >= K) break;
    const float4* p = reinterpret_cast<const float4*>(cr + k + 8 * half);
    const float4 a = __ldg(p), b = __ldg(p + 1);
    const float cf[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    uint16_t* v = reinterpret_cast<uint16_t*>(&in[half]);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = Traits<T>::from_float(__fsub_rn(Traits<T>::to_float(v[i]), cf[i]));
  }
}

// Reduce a row's two fp32 sums (and with kMax the max of 16-bit magnitude bits) over the kRow threads that own it:
// shuffles inside a warp, shared memory across the warps of a row; every thread of the block calls it. Each kSlot
// has its own shared array, so calls with different slots need no barrier between them.
template <int kRow, bool kMax, int kSlot>
__device__ __forceinline__ void row_reduce(float& a, float& b, uint32_t& mx) {
#pragma unroll
  for (int off = (kRow < 32 ? kRow : 32) / 2; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
    if constexpr (kMax) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  }
  if constexpr (kRow > 32) {
    constexpr int kWarpsPerRow = kRow / 32;
    __shared__ float red[kThreads / 32][kMax ? 3 : 2];
    const int warp = threadIdx.x / 32;
    if ((threadIdx.x & 31) == 0) {
      red[warp][0] = a;
      red[warp][1] = b;
      if constexpr (kMax) red[warp][2] = __uint_as_float(mx);
    }
    __syncthreads();
    const int first = (warp / kWarpsPerRow) * kWarpsPerRow;
    a = 0.f;
    b = 0.f;
    if constexpr (kMax) mx = 0;
#pragma unroll
    for (int w = 0; w < kWarpsPerRow; ++w) {
      a += red[first + w][0];
      b += red[first + w][1];
      if constexpr (kMax) mx = max(mx, __float_as_uint(red[first + w][2]));
    }
  }
}

// The runs c = sub, sub + kRow, ... of a row as the main passes load them (zero padded, GELU applied for kAct = 1,
// the centre cr subtracted if given), one at a time.
template <class T, int kRow, int kAct, class F>
__device__ void for_each_run(const uint16_t* xr, const float* cr, int K, int runs, int sub, bool row_ok, F f) {
  for (int c = sub; c < runs; c += kRow) {
    uint4 in[2];
    load_run(xr, K, c, row_ok, in);
    if constexpr (kAct == 1) gelu_run<T>(in);
    centre_run<T>(in, row_ok ? cr : nullptr, K, c);
    f(in);
  }
}

// The row's max |x| as 16-bit magnitude bits (NaN above +inf), one more read of the row; every thread of the block
// calls it. (The FP8 prune has it already: each group's largest value is kept.)
template <class T, int kRow, int kAct>
__device__ uint32_t row_max_bits(const uint16_t* xr, const float* cr, int K, int runs, int sub, bool row_ok) {
  uint32_t amax = 0;
  float z0 = 0.f, z1 = 0.f;
  for_each_run<T, kRow, kAct>(xr, cr, K, runs, sub, row_ok, [&](const uint4 (&in)[2]) {
    const uint16_t* e = reinterpret_cast<const uint16_t*>(in);
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = max(amax, uint32_t(e[i] & 0x7FFFu));
  });
  row_reduce<kRow, true, 1>(z0, z1, amax);
  return amax;
}

// The norm scale of rows whose |x|^2 or |x~|^2 overflowed float32 (|x| above ~1.8e19): the sums again with the row
// divided by a power of two p near its max |x| (amax, magnitude bits), exact, as rtlynx.reference.nm.norm_scale; other
// rows keep s. Reads the row once more, so it runs only when a row of the block overflowed; every thread of the block
// calls it.
template <class T, int kRow, int kAct>
__device__ float rescaled_norm_scale(const uint16_t* xr, const float* cr, int K, int runs, int sub, bool row_ok,
                                     float eps, float sx, float sp, float s, uint32_t amax) {
  const bool redo = row_ok && (isinf(sx) || isinf(sp));
  const float a = Traits<T>::to_float(uint16_t(amax));  // NaN bits if the row holds a NaN
  const bool ok = redo && isfinite(a) && a > 0.f;         // an inf in the row: s stays inf / NaN, as the reference
  int e2 = 0;
  frexpf(ok ? a : 1.0f, &e2);  // a = mant * 2^e2, mant in [0.5, 1): p = 2^(e2 - 1)
  const float inv_p = ldexpf(1.0f, 1 - e2);
  float sx2 = 0.f, sp2 = 0.f;
  for_each_run<T, kRow, kAct>(xr, cr, K, runs, sub, row_ok, [&](const uint4 (&in)[2]) {
    uint4 out;
    uint16_t word;
    process_run<T, true>(in, out, word, sx2, sp2, inv_p);
  });
  row_reduce<kRow, false, 2>(sx2, sp2, amax);
  return ok ? sqrtf(sx2 / (sp2 + eps * inv_p * inv_p)) : s;
}

// kRow threads own one row (kRow in {8, ..., 128}); a 128-thread block owns 128 / kRow rows. Few rows (small M)
// -> more threads per row, so every shape puts enough loads in flight; many rows -> a warp or less per row.
// kAct: 0 = X as loaded; 1 = X = GELU_tanh(loaded run), and the dense X is written to y (row stride ldy) if y.
// kCentre: rows m < cen.Mt centred, the rest from cen.crows (M counts both).
template <class T, int kRow, int kUnroll, bool kFast, int kAct, bool kCentre>
__global__ void __launch_bounds__(kThreads)
prune_compress_kernel(const uint16_t* __restrict__ x, long ldx, int M, int K, const uint16_t* __restrict__ h,
                      long ldh, int r, uint16_t* __restrict__ values, long ldv, uint16_t* __restrict__ meta,
                      float* __restrict__ scale, int with_norm, float eps, int Kp, int mtiles,
                      uint16_t* __restrict__ y, long ldy, Centre cen) {
  constexpr int kRowsPerBlock = kThreads / kRow;
  // Let a GEMM launched with PDL start its prologue (it waits with griddepcontrol.wait before reading).
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int sub = threadIdx.x % kRow;
  const int m = blockIdx.x * kRowsPerBlock + threadIdx.x / kRow;
  const bool row_ok = m < M;
  const int runs = Kp / 16;       // 16-element runs of the padded row
  const bool full = (K % 16) == 0;
  const float* cr;
  const uint16_t* xr = row_source<kCentre>(x, ldx, m, cen, cr);
  if (!row_ok) cr = nullptr;
  uint16_t* vr = values + long(m) * ldv;
  float sx = 0.f, sp = 0.f;

  auto load = [&](uint4 (&in)[kUnroll][2], int base) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + kRow * u;
      load_run(xr, K, c, row_ok && c < runs, in[u]);
    }
  };
  auto store = [&](uint4 (&in)[kUnroll][2], int base) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      int c = base + kRow * u;
      if (c < runs) {
        if constexpr (kAct == 1) {
          gelu_run<T>(in[u]);
          const int k = c * 16;
          if (y != nullptr && row_ok && k < K) {
            uint16_t* yr = y + long(m) * ldy + k;
            *reinterpret_cast<uint4*>(yr) = in[u][0];
            if (full || k + 16 <= K) *reinterpret_cast<uint4*>(yr + 8) = in[u][1];
          }
        }
        if constexpr (kCentre) centre_run<T>(in[u], cr, K, c);
        uint4 out;
        uint16_t word;
        process_run<T, kFast>(in[u], out, word, sx, sp);
        if (row_ok) *reinterpret_cast<uint4*>(vr + c * 8) = out;
        meta[meta_word_index(m, c, mtiles)] = word;  // rows M..Mp-1 get zero groups: 0x4444
      }
    }
  };
  constexpr int kStep = kRow * kUnroll;
  if constexpr (kFast) {
    // software pipelined: the loads of the next step are in flight while this step is processed
    uint4 cur[kUnroll][2], nxt[kUnroll][2];
    load(cur, sub);
    for (int base = sub; base < runs; base += kStep) {
      if (base + kStep < runs) load(nxt, base + kStep);
      store(cur, base);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        cur[u][0] = nxt[u][0];
        cur[u][1] = nxt[u][1];
      }
    }
  } else {
    for (int base = sub; base < runs; base += kStep) {
      uint4 in[kUnroll][2];
      load(in, base);
      store(in, base);
    }
  }
  uint32_t unused = 0;
  row_reduce<kRow, false, 0>(sx, sp, unused);
  float s = with_norm ? sqrtf(sx / (sp + eps)) : 1.0f;
  if (with_norm && __syncthreads_or(row_ok && (isinf(sx) || isinf(sp))))
    s = rescaled_norm_scale<T, kRow, kAct>(xr, cr, K, runs, sub, row_ok, eps, sx, sp, s,
                                           row_max_bits<T, kRow, kAct>(xr, cr, K, runs, sub, row_ok));
  if (row_ok && sub == 0 && scale != nullptr) scale[m] = s;

  // LoRA tail: logical columns Kp .. Kp + 2r - 1, groups [h0/s, -, h1/s, -], nibble 0b1000 (slots 0 and 2, so that
  // B-expanded holds B's column t at Kp + 2t and lora_B can be a strided view of it: rtlynx/sites.py).
  if (r > 0) {
    const int tail_runs = (2 * r) / 16;  // each run holds 8 h values
    const float inv = s > 0.f ? 1.0f / s : 0.f;  // an all-zero row has s = 0 and h = 0
    for (int t = sub; t < tail_runs; t += kRow) {
      uint4 out = make_uint4(0, 0, 0, 0);
      if (row_ok) {
        const uint16_t* hr = h + long(m) * ldh + t * 8;
        uint4 hv = *reinterpret_cast<const uint4*>(hr);
        const uint16_t* he = reinterpret_cast<const uint16_t*>(&hv);
        uint16_t* o = reinterpret_cast<uint16_t*>(&out);
#pragma unroll
        for (int i = 0; i < 8; ++i)
          o[i] = with_norm ? Traits<T>::from_float(Traits<T>::to_float(he[i]) * inv) : he[i];
        *reinterpret_cast<uint4*>(vr + (Kp / 2) + t * 8) = out;
      }
      meta[meta_word_index(m, runs + t, mtiles)] = uint16_t(0x8888);
    }
  }
}

// ------------------------------------------------------------------------------------------------ FP8 (e4m3)
// Prune + quantise (rtlynx.reference.fp8.compress_sm90_fp8): the same 2:4 selection (and GELU producer) as above,
// then one scale per token from the absmax of the kept values, sx = absmax / 448, kept values q = e4m3(v / sx)
// (IEEE division, saturating round-to-nearest-even cast == torch's clamp + cast). The scale needs the whole row
// before the first value is written, so a thread keeps its runs' kept values in registers (kMaxRuns runs of 16
// logical elements per thread, kRow threads per row: K <= 16 * kMaxRuns * kRow).
//
// sm90 metadata layout for 8-bit A (CUTLASS Sm90GemmSparseConfig, TensorEAtom_8bit: a row-major 64 x 128 block of
// logical elements, atoms M-first): byte(m, k) = 16 m + (k % 128) / 8 + 16 Mp (k / 128), low nibble = lower group;
// in 16-bit words for run c = k / 16: word = 8 m + c % 8 + 8 Mp (c / 8).
//
// Outputs: values [M, ldv] bytes (run c at byte 8c), meta, rs[m] = s * sx (the GEMM's row scale), sx[m], s[m]
// (norm scale; 1 without norm). An all-zero row has sx = 0 and q = 0; a NaN in the row makes sx and rs NaN.
__device__ __forceinline__ long meta8_word_index(int m, int c, int Mp) {
  return 8L * m + (c & 7) + 8L * Mp * (c >> 3);
}

template <class T, int kRow, int kMaxRuns, int kAct, bool kCentre>
__global__ void __launch_bounds__(kThreads)
prune_quant_fp8_kernel(const uint16_t* __restrict__ x, long ldx, int M, int K, uint8_t* __restrict__ values,
                       long ldv, uint16_t* __restrict__ meta, float* __restrict__ rs, float* __restrict__ sx_out,
                       float* __restrict__ s_out, int with_norm, float eps, int Kp, int Mp, Centre cen) {
  constexpr int kRowsPerBlock = kThreads / kRow;
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int sub = threadIdx.x % kRow;
  const int m = blockIdx.x * kRowsPerBlock + threadIdx.x / kRow;
  const bool row_ok = m < M;
  const int runs = Kp / 16;
  const float* cr;
  const uint16_t* xr = row_source<kCentre>(x, ldx, m, cen, cr);
  if (!row_ok) cr = nullptr;

  uint4 kept[kMaxRuns];
  float sx = 0.f, sp = 0.f;
  uint32_t amax = 0;  // max |kept| as 16-bit magnitude bits: the order of the values, NaN above +inf
  // All of the thread's loads are issued before any is used (up to 16 x 16 bytes in flight per thread).
  uint4 in[kMaxRuns][2];
#pragma unroll
  for (int j = 0; j < kMaxRuns; ++j) {
    const int c = sub + kRow * j;
    load_run(xr, K, c, row_ok && c < runs, in[j]);
  }
#pragma unroll
  for (int j = 0; j < kMaxRuns; ++j) {
    const int c = sub + kRow * j;
    if (c < runs) {
      if constexpr (kAct == 1) gelu_run<T>(in[j]);
      if constexpr (kCentre) centre_run<T>(in[j], cr, K, c);
      uint16_t word;
      process_run<T, true>(in[j], kept[j], word, sx, sp);
      meta[meta8_word_index(m, c, Mp)] = word;  // rows M..Mp-1: zero groups, 0x4444
      const uint16_t* kv = reinterpret_cast<const uint16_t*>(&kept[j]);
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = max(amax, uint32_t(kv[i] & 0x7FFFu));
    }
  }
  row_reduce<kRow, true, 0>(sx, sp, amax);
  float s = with_norm ? sqrtf(sx / (sp + eps)) : 1.0f;
  if (with_norm && __syncthreads_or(row_ok && (isinf(sx) || isinf(sp))))
    s = rescaled_norm_scale<T, kRow, kAct>(xr, cr, K, runs, sub, row_ok, eps, sx, sp, s, amax);
  const float qs = __fdiv_rn(Traits<T>::to_float(uint16_t(amax)), 448.0f);
  const float safe = qs > 0.f ? qs : 1.0f;  // NaN > 0 is false: a NaN row divides by 1, as the reference
  if (row_ok && sub == 0) {
    rs[m] = s * qs;
    if (sx_out != nullptr) sx_out[m] = qs;
    if (s_out != nullptr) s_out[m] = s;
  }
  if (!row_ok) return;
  uint8_t* vr = values + long(m) * ldv;
#pragma unroll
  for (int j = 0; j < kMaxRuns; ++j) {
    const int c = sub + kRow * j;
    if (c >= runs) continue;
    const uint16_t* kv = reinterpret_cast<const uint16_t*>(&kept[j]);
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = make_float2(__fdiv_rn(Traits<T>::to_float(kv[2 * i]), safe),
                                   __fdiv_rn(Traits<T>::to_float(kv[2 * i + 1]), safe));
      const uint32_t q2 = __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);  // .x in the low byte
      if (i < 2) lo |= q2 << (16 * i);
      else hi |= q2 << (16 * (i - 2));
    }
    *reinterpret_cast<uint2*>(vr + 8L * c) = make_uint2(lo, hi);
  }
}

template <class T, int kAct, bool kCentre = false>
int launch_fp8(const void* x, long ldx, int M, int K, void* values, long ldv, void* meta, float* rs, float* sx,
               float* s, int with_norm, float eps, cudaStream_t stream, Centre cen = Centre{}) {
  constexpr int kMaxRuns = 8;
  const int Kp = (K + 127) / 128 * 128;
  const int Mp = (M + 63) / 64 * 64;
  const int runs = Kp / 16;
  auto go = [&](auto row_c) {
    constexpr int kRow = decltype(row_c)::value;
    const dim3 grid(Mp / (kThreads / kRow));
    prune_quant_fp8_kernel<T, kRow, kMaxRuns, kAct, kCentre><<<grid, kThreads, 0, stream>>>(
        static_cast<const uint16_t*>(x), ldx, M, K, static_cast<uint8_t*>(values), ldv, static_cast<uint16_t*>(meta),
        rs, sx, s, with_norm, eps, Kp, Mp, cen);
  };
  if (runs <= 32 * kMaxRuns) go(std::integral_constant<int, 32>{});
  else if (runs <= 64 * kMaxRuns) go(std::integral_constant<int, 64>{});
  else if (runs <= 128 * kMaxRuns) go(std::integral_constant<int, 128>{});
  else return RTLYNX_ERR_ARGS;  // K > 16384: the row does not fit the threads' registers
  return int(cudaGetLastError());
}

int sm_count() {
  static int n = 0;
  if (n == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    if (n <= 0) n = 132;
  }
  return n;
}

int g_impl = 3;  // 3: fast selection + pipelined loads (default); 2: the v2 kernel (kept for A/B and as fallback)

template <class T, int kRow, int kAct, bool kCentre>
void launch_row(const void* x, long ldx, int M, int K, const void* h, long ldh, int r, void* values, long ldv,
                void* meta, float* scale, int with_norm, float eps, int Kp, int Mp, void* y, long ldy,
                cudaStream_t stream, const Centre& cen) {
  const dim3 grid(Mp / (kThreads / kRow));
  auto args = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(
        static_cast<const uint16_t*>(x), ldx, M, K, static_cast<const uint16_t*>(h), ldh, r,
        static_cast<uint16_t*>(values), ldv, static_cast<uint16_t*>(meta), scale, with_norm, eps, Kp, Mp / 64,
        static_cast<uint16_t*>(y), ldy, cen);
  };
  if (g_impl == 2)
    args(prune_compress_kernel<T, kRow, 2, false, kAct, kCentre>);
  else
    args(prune_compress_kernel<T, kRow, 2, true, kAct, kCentre>);
}

template <class T, int kAct, bool kCentre = false>
int launch(const void* x, long ldx, int M, int K, const void* h, long ldh, int r, void* values, long ldv,
           void* meta, float* scale, int with_norm, float eps, void* y, long ldy, cudaStream_t stream,
           Centre cen = Centre{}) {
  const int Kp = (K + 127) / 128 * 128;
  const int Mp = (M + 63) / 64 * 64;
  const int runs = Kp / 16;
  // Threads per row: the fewest (less reduction, whole rows per warp) that still give every SM about
  // 1024 threads; never more than the row has runs.
  const long want = long(sm_count()) * 1024;
  int row = 32;
  while (row < 128 && long(Mp) * row < want) row *= 2;
  while (row > 8 && row / 2 >= runs) row /= 2;
  auto go = [&](auto row_c) {
    launch_row<T, decltype(row_c)::value, kAct, kCentre>(x, ldx, M, K, h, ldh, r, values, ldv, meta, scale,
                                                         with_norm, eps, Kp, Mp, y, ldy, stream, cen);
  };
  switch (row) {
    case 8: go(std::integral_constant<int, 8>{}); break;
    case 16: go(std::integral_constant<int, 16>{}); break;
    case 32: go(std::integral_constant<int, 32>{}); break;
    case 64: go(std::integral_constant<int, 64>{}); break;
    default: go(std::integral_constant<int, 128>{}); break;
  }
  return int(cudaGetLastError());
}

}  // namespace

// Select the prune kernel implementation (2 or 3); returns the previous one. Not thread-safe: A/B tests only.
extern "C" RTLYNX_API int rtlynx_prune_set_impl_sm90(int impl) {
  int old = g_impl;
  if (impl == 2 || impl == 3) g_impl = impl;
  return old;
}

namespace {
// rtlynx_prune_compress_sm90 and its centred variant (M token rows, then R rows of cen.crows).
template <bool kCentre>
int prune_entry(int dtype, const void* x, long ldx, int M, int K, const void* h, long ldh, int r, void* values,
                long ldv, void* meta, float* scale, int with_norm, float eps, void* stream, const Centre& cen, int R) {
  if (M <= 0 || K <= 0 || K % 8 != 0 || ldx % 8 != 0 || ldv % 8 != 0) return RTLYNX_ERR_ARGS;
  const int Kp = (K + 127) / 128 * 128;
  if (ldv < Kp / 2 + r || r < 0 || r % 64 != 0 || (r > 0 && (h == nullptr || ldh % 8 != 0))) return RTLYNX_ERR_ARGS;
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(values) | reinterpret_cast<uintptr_t>(h)) % 16)
    return RTLYNX_ERR_ARGS;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == RTLYNX_BF16)
    return launch<__nv_bfloat16, 0, kCentre>(x, ldx, M + R, K, h, ldh, r, values, ldv, meta, scale, with_norm, eps,
                                             nullptr, 0, st, cen);
  if (dtype == RTLYNX_FP16)
    return launch<__half, 0, kCentre>(x, ldx, M + R, K, h, ldh, r, values, ldv, meta, scale, with_norm, eps, nullptr,
                                      0, st, cen);
  return RTLYNX_ERR_CONFIG;
}
}  // namespace

extern "C" RTLYNX_API int rtlynx_prune_compress_sm90(int dtype, const void* x, long ldx, int M, int K,
                                                      const void* h, long ldh, int r, void* values, long ldv,
                                                      void* meta, float* scale, int with_norm, float eps,
                                                      void* stream) {
  return prune_entry<false>(dtype, x, ldx, M, K, h, ldh, r, values, ldv, meta, scale, with_norm, eps, stream,
                            Centre{}, 0);
}

extern "C" RTLYNX_API int rtlynx_gelu_prune_compress_sm90(int dtype, const void* h, long ldh, int M, int K, void* y,
                                                           long ldy, void* values, long ldv, void* meta, float* scale,
                                                           int with_norm, float eps, void* stream) {
  if (M <= 0 || K <= 0 || K % 8 != 0 || ldh % 8 != 0 || ldv % 8 != 0) return RTLYNX_ERR_ARGS;
  const int Kp = (K + 127) / 128 * 128;
  if (ldv < Kp / 2 || (y != nullptr && (ldy % 8 != 0 || ldy < K))) return RTLYNX_ERR_ARGS;
  if ((reinterpret_cast<uintptr_t>(h) | reinterpret_cast<uintptr_t>(values) | reinterpret_cast<uintptr_t>(y)) % 16)
    return RTLYNX_ERR_ARGS;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == RTLYNX_BF16)
    return launch<__nv_bfloat16, 1>(h, ldh, M, K, nullptr, 0, 0, values, ldv, meta, scale, with_norm, eps, y, ldy, st);
  if (dtype == RTLYNX_FP16)
    return launch<__half, 1>(h, ldh, M, K, nullptr, 0, 0, values, ldv, meta, scale, with_norm, eps, y, ldy, st);
  return RTLYNX_ERR_CONFIG;
}

extern "C" RTLYNX_API int rtlynx_prune_quant_fp8_sm90(int dtype, int act, const void* x, long ldx, int M, int K,
                                                       void* values, long ldv, void* meta, float* rs, float* sx,
                                                       float* s, int with_norm, float eps, void* stream) {
  if (M <= 0 || K <= 0 || K % 8 != 0 || ldx % 8 != 0 || ldv % 16 != 0 || (act != 0 && act != 1)) return RTLYNX_ERR_ARGS;
  const int Kp = (K + 127) / 128 * 128;
  if (ldv < Kp / 2 || rs == nullptr) return RTLYNX_ERR_ARGS;
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(values)) % 16) return RTLYNX_ERR_ARGS;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == RTLYNX_BF16)
    return act ? launch_fp8<__nv_bfloat16, 1>(x, ldx, M, K, values, ldv, meta, rs, sx, s, with_norm, eps, st)
               : launch_fp8<__nv_bfloat16, 0>(x, ldx, M, K, values, ldv, meta, rs, sx, s, with_norm, eps, st);
  return RTLYNX_ERR_CONFIG;  // bf16 only: the FP8 GEMM writes bf16
}

namespace {
// The centring operands of both *_centred entry points, checked (false: bad shapes or alignment) into cen.
bool centre_args(int M, int K, const float* cvec, long ldc, int per, const void* crows, long ldcr, int R,
                 Centre& cen) {
  if (R < 0 || cvec == nullptr || per <= 0 || M % per != 0 || ldc % 4 != 0 || ldc < K) return false;
  if (R > 0 && (crows == nullptr || ldcr % 8 != 0 || ldcr < K)) return false;
  if ((reinterpret_cast<uintptr_t>(cvec) | reinterpret_cast<uintptr_t>(crows)) % 16) return false;
  cen.cvec = cvec;
  cen.ldc = ldc;
  cen.per = per;
  cen.crows = static_cast<const uint16_t*>(crows);
  cen.ldcr = ldcr;
  cen.Mt = M;
  return true;
}
}  // namespace

// Token-mean centring (see the top of the file): the M token rows of x [M, K] minus cvec[m / per] (float32 [M / per,
// ldc], ldc % 4 == 0, 16-byte aligned), then the R rows of crows [R, ldcr] (same dtype as x) as given: values, meta
// and scale of M + R rows, the LoRA tail read from h [M + R, r] as rtlynx_prune_compress_sm90.
extern "C" RTLYNX_API int rtlynx_prune_compress_centred_sm90(int dtype, const void* x, long ldx, int M, int K,
                                                              const float* cvec, long ldc, int per, const void* crows,
                                                              long ldcr, int R, const void* h, long ldh, int r,
                                                              void* values, long ldv, void* meta, float* scale,
                                                              int with_norm, float eps, void* stream) {
  Centre cen;
  if (M <= 0 || K <= 0 || !centre_args(M, K, cvec, ldc, per, crows, ldcr, R, cen)) return RTLYNX_ERR_ARGS;
  return prune_entry<true>(dtype, x, ldx, M, K, h, ldh, r, values, ldv, meta, scale, with_norm, eps, stream, cen, R);
}

// The FP8 prune + quantise with token-mean centring: M token rows of x minus cvec[m / per], then the R rows of crows,
// as rtlynx_prune_compress_centred_sm90; outputs of M + R rows as rtlynx_prune_quant_fp8_sm90 (act 0 only).
extern "C" RTLYNX_API int rtlynx_prune_quant_fp8_centred_sm90(int dtype, const void* x, long ldx, int M, int K,
                                                               const float* cvec, long ldc, int per,
                                                               const void* crows, long ldcr, int R, void* values,
                                                               long ldv, void* meta, float* rs, float* sx, float* s,
                                                               int with_norm, float eps, void* stream) {
  Centre cen;
  if (M <= 0 || K <= 0 || K % 8 != 0 || ldx % 8 != 0 || ldv % 16 != 0) return RTLYNX_ERR_ARGS;
  if (!centre_args(M, K, cvec, ldc, per, crows, ldcr, R, cen)) return RTLYNX_ERR_ARGS;
  const int Kp = (K + 127) / 128 * 128;
  if (ldv < Kp / 2 || rs == nullptr) return RTLYNX_ERR_ARGS;
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(values)) % 16) return RTLYNX_ERR_ARGS;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == RTLYNX_BF16)
    return launch_fp8<__nv_bfloat16, 0, true>(x, ldx, M + R, K, values, ldv, meta, rs, sx, s, with_norm, eps, st, cen);
  return RTLYNX_ERR_CONFIG;  // bf16 only: the FP8 GEMM writes bf16
}
