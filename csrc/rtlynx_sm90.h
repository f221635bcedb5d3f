// rtlynx sm90 kernels: plain C ABI (no torch headers), called from rtlynx/ops through ctypes.
//
// Notation: M tokens, K input features, N output features, r LoRA rank.
//   Mp = round_up(M, 64), Kp = round_up(K, 128)   (the sm90 metadata atom is 64 x 128 logical elements)
//   values [M, Kp/2 + r]  kept elements in index order ("rows" values layout), row stride ldv
//   meta   [Mp * Kg / 8] bytes, Kg = Kp + 2r, CUTLASS 3.x Sm90GemmSparseConfig LayoutE (see
//          rtlynx/reference/sm90.py for the exact permutation of the "rows" layout)
// Every function returns 0 on success, a cudaError_t (> 0) or a negative rtlynx error code.
#pragma once
#include <cstddef>
#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes
enum { RTLYNX_BF16 = 0, RTLYNX_FP16 = 1 };
enum {
  RTLYNX_ERR_ARGS = -1,        // bad shapes / alignment
  RTLYNX_ERR_CANNOT_IMPL = -2, // CUTLASS can_implement refused
  RTLYNX_ERR_INIT = -3,        // CUTLASS initialize failed
  RTLYNX_ERR_RUN = -4,         // CUTLASS run failed
  RTLYNX_ERR_WORKSPACE = -5,   // kernel would need a workspace (not supported)
  RTLYNX_ERR_CONFIG = -6,      // unknown config id / dtype
};

// Prune X [M, K] (row stride ldx elements) to 2:4 along K, write values/meta in the sm90 layout and the
// per-token norm scale s [M] (fp32, s = sqrt(|x|^2 / (|x~|^2 + eps)); a row whose squares overflow fp32 is summed
// again divided by a power of two near its max |x|, as rtlynx.reference.nm.norm_scale). Rows M..Mp-1 and columns K..Kp-1 are
// written as zeros (values) and "keep 0,1" nibbles (meta). If h != nullptr ([M, r], row stride ldh, same dtype),
// the LoRA tail is appended: logical columns Kp .. Kp+2r-1 hold groups [h[2g]/s, -, h[2g+1]/s, -] (slots 0, 2)
// (divided by s only when with_norm), so that the sparse GEMM against [W | B-expanded] adds h B^T after the
// epilogue multiplies by s. r must be a multiple of 64 (pad h with zero columns).
int rtlynx_prune_compress_sm90(int dtype, const void* x, long ldx, int M, int K,
                               const void* h, long ldh, int r,
                               void* values, long ldv, void* meta, float* scale, int with_norm, float eps,
                               void* stream);

// Token-mean centring: the M token rows of X minus cvec[m / per] (float32 [M / per, ldc], ldc % 4 == 0, 16-byte
// aligned; one fp32 subtraction rounded once to the dtype, before the selection), then the R rows of crows [R, ldcr]
// (same dtype, e.g. the centre's 2:4-exact rows) as given: values / meta / scale of M + R rows, the LoRA tail read
// from h [M + R, r]. Reference: rtlynx.reference.sm90.compress_sm90 of [centred(x, c); crows].
int rtlynx_prune_compress_centred_sm90(int dtype, const void* x, long ldx, int M, int K, const float* cvec, long ldc,
                                       int per, const void* crows, long ldcr, int R, const void* h, long ldh, int r,
                                       void* values, long ldv, void* meta, float* scale, int with_norm, float eps,
                                       void* stream);

// Producer-fused variant for the MLP down-projection: X = GELU_tanh(H) computed on the fly from the
// pre-activation H [M, K] (row stride ldh), then exactly the prune/compress/norm of rtlynx_prune_compress_sm90
// on X (values [M, Kp/2] with row stride ldv >= Kp/2, meta, scale; no LoRA tail). GELU per element, in fp32,
// the expression of torch's CUDA kernel (F.gelu(h, approximate="tanh")):
//   u = h*h*h; inner = kBeta * fma(0.044715f, u, h); g = (0.5f*h) * (1 + tanhf(inner)),
//   kBeta = (float)(sqrt(2) * 2/sqrt(pi) * 0.5), rounded once (RN) to the dtype.
// If y != nullptr the dense GELU output [M, K] (row stride ldy) is written too (for a LoRA branch on dense x).
int rtlynx_gelu_prune_compress_sm90(int dtype, const void* h, long ldh, int M, int K, void* y, long ldy,
                                    void* values, long ldv, void* meta, float* scale, int with_norm, float eps,
                                    void* stream);

// Y [M, N] (row stride ldy) = s[m] * (A~ @ W^T)[m, n] + bias[n]; A~ given by values/meta with logical K = Kg
// (multiple of 128), W [N, Kg] row-major (row stride ldw >= Kg, a multiple of 8). scale may be null (s = 1), bias
// may be null.
// sched: tile-scheduler options, max_swizzle_size | raster << 8 (raster 0 heuristic, 1 along M, 2 along N)
// | 1 << 16 to launch with programmatic dependent launch; 0 = CUTLASS defaults, no PDL.
int rtlynx_sparse_gemm_sm90(int config, int dtype, const void* values, long ldv, const void* meta,
                            const void* w, long ldw, void* y, long ldy, const float* scale, const void* bias,
                            int M, int N, int Kg, int sched, void* stream);

int rtlynx_sparse_gemm_sm90_num_configs(void);
const char* rtlynx_sparse_gemm_sm90_config_name(int config);
// Shared-memory bytes / stages of a config (for notes), -1 if unknown.
int rtlynx_sparse_gemm_sm90_config_info(int config, int* smem_bytes, int* stages);


// ---------------------------------------------------------------------------------------------- FP8 (e4m3)
// Prune X [M, K] bf16 to 2:4 (act 1: X = GELU_tanh(loaded), as rtlynx_gelu_prune_compress_sm90), then quantise the kept
// values per token: sx[m] = absmax(kept) / 448, values = e4m3(kept / sx) (saturating) [M, Kp/2] bytes (row stride
// ldv >= Kp/2, a multiple of 16), meta in the 8-bit sm90 layout (Mp * Kp / 8 bytes: byte(m, k) = 16 m + (k % 128)/8
// + 16 Mp (k / 128)), rs[m] = s[m] * sx[m] (the GEMM's row scale); sx and s (norm scale, 1 without norm) are
// optional outputs (null: not written). K <= 16384. Reference: rtlynx.reference.fp8.compress_sm90_fp8.
int rtlynx_prune_quant_fp8_sm90(int dtype, int act, const void* x, long ldx, int M, int K, void* values, long ldv,
                                void* meta, float* rs, float* sx, float* s, int with_norm, float eps, void* stream);

// The same with token-mean centring (act 0), as rtlynx_prune_compress_centred_sm90: outputs of M + R rows.
int rtlynx_prune_quant_fp8_centred_sm90(int dtype, const void* x, long ldx, int M, int K, const float* cvec, long ldc,
                                        int per, const void* crows, long ldcr, int R, void* values, long ldv,
                                        void* meta, float* rs, float* sx, float* s, int with_norm, float eps,
                                        void* stream);

// Y [M, N] bf16 (row stride ldy) = rs[m] * sw[n] * (A~ @ W^T)[m, n] + bias[n]; A~ e4m3 from values/meta (logical
// K = Kg, a multiple of 128; 256 for the tile-K-256 configs), W e4m3 [N, Kg] row-major (row stride ldw >= Kg, a
// multiple of 16), sw fp32 [N], bias bf16 [N] or null. fp32 accumulation (FP8 fast accumulation).
int rtlynx_sparse_gemm_fp8_sm90(int config, const void* values, long ldv, const void* meta, const void* w, long ldw,
                                void* y, long ldy, const float* rs, const float* sw, const void* bias, int M, int N,
                                int Kg, int sched, void* stream);
int rtlynx_sparse_gemm_fp8_sm90_num_configs(void);
const char* rtlynx_sparse_gemm_fp8_sm90_config_name(int config);

#ifdef __cplusplus
}
#endif
