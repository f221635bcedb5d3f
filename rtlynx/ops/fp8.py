"""torch.library ops of the FP8 (e4m3) + 2:4 Hopper kernels, with fake (meta) implementations.

Spec: :mod:`rtlynx.reference.fp8` (``compress_sm90_fp8``, ``quantize_weight_e4m3``, ``sparse_gemm_fp8``).
Notation as in :mod:`rtlynx.ops.sm90`; Kp = round_up(K, 128), Mp = round_up(M, 64).

- ``rtlynx::prune_quant_fp8_sm90(x [M,K], norm, eps, act=0) -> (values [M,Kp/2] e4m3, meta [Mp*Kp/8] u8, rs [M],
  sx [M], s [M])``: 2:4 prune (act 1: of GELU_tanh(x)), per-token e4m3 quantisation of the kept values, the 8-bit
  sm90 metadata layout, the GEMM row scale ``rs = s * sx``.
- ``rtlynx::sparse_gemm_fp8_sm90(values, meta, wq [N,Kg] e4m3, rs [M], sw [N], bias?, config=-1, sched=0)
  -> y [M,N] bf16``: ``rs[m] * sw[n] * (A~ @ Wq^T) + bias`` on wgmma.sp e4m3 (fp32 accumulation, fast accum).
- ``rtlynx::fp8_site_sm90(x [M,K], wq [N,Kp], sw [N], bias?, splits, norm, eps, act=0) -> [y_i [M, N_i]]``: one
  activation site: one prune + quantise pass, one FP8 sparse GEMM per member on its rows of ``wq``.

bf16 activations only (the GEMM writes bf16); K <= 16384 (the prune keeps a row in registers).
Every op checks its operands with :mod:`rtlynx.ops._checks` (``check_fp8_*``, raising :class:`Unsupported`) in its
CUDA implementation and in its fake; the internal ``_prune_impl``, ``_gemm_impl`` and ``_site_impl`` take operands
their callers checked (``rtlynx.ops.fp8_site`` checks once, then calls ``_site_impl``).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from ..reference.fp8 import quantize_weight_e4m3
from ..reference.sm90 import padded_shape
from . import _checks, _lib
from ._checks import FP8
from .sm90 import PDL, _align, _ptr, _scratch, _stream

_DT = {torch.bfloat16: 0}  # the FP8 GEMM writes bf16, so its producer reads bf16

_LIB = torch.library.Library("rtlynx", "FRAGMENT")
_LIB.define("prune_quant_fp8_sm90(Tensor x, bool norm, float eps, int act=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.define("sparse_gemm_fp8_sm90(Tensor values, Tensor meta, Tensor wq, Tensor rs, Tensor sw, Tensor? bias, "
            "int config=-1, int sched=0) -> Tensor")
_LIB.define("fp8_site_sm90(Tensor x, Tensor wq, Tensor sw, Tensor? bias, int[] splits, bool norm, float eps, "
            "int act=0) -> Tensor[]")

# Config ids are positions in csrc/gen_configs.py's FP8_CONFIGS (csrc/sparse_gemm_fp8_sm90_dispatch.cu).
CONFIG_NAMES = (
    "f8_t128x128x128_coop_c2x1",
    "f8_t128x256x128_coop_c2x1",
    "f8_t256x128x128_coop_c1x2",
    "f8_t128x128x128_pp_c1x2",
    "f8_t128x128x256_coop_c2x1",
    "f8_t256x128x256_coop_c1x2",
)
TILE_K = {name: int(name.split("x")[2].split("_")[0]) for name in CONFIG_NAMES}
# (M, N, Kg) -> (config name, sched): the exceptions to the heuristic below, from the H200 sweep of
# benchmarks/fp8.py linear --sweep (results/fp8_h200.json; 128 x 256 x 128, cluster 2x1, won 10 of the 12 large
# shapes, the 256 x 128 tile tied on the 11th).
CONFIG_TABLE: dict[tuple[int, int, int], tuple[str, int]] = {
    (4608, 3072, 15360): ("f8_t128x128x256_coop_c2x1", 0),  # 0.248 ms vs 0.270 for the default
}


@functools.lru_cache(maxsize=1)
def _library():
    """The kernel library with the FP8 entry points declared (absent from libraries built before them)."""
    L = _lib.lib()
    if not hasattr(L, "rtlynx_prune_quant_fp8_sm90"):
        raise RuntimeError("rtlynx FP8 kernels: the loaded library predates them (rebuild it, or unset RTLYNX_LIB)")
    c_int, c_long, c_float, c_void_p = ctypes.c_int, ctypes.c_long, ctypes.c_float, ctypes.c_void_p
    L.rtlynx_prune_quant_fp8_sm90.argtypes = [c_int, c_int, c_void_p, c_long, c_int, c_int, c_void_p, c_long, c_void_p,
                                               c_void_p, c_void_p, c_void_p, c_int, c_float, c_void_p]
    L.rtlynx_prune_quant_fp8_sm90.restype = c_int
    L.rtlynx_sparse_gemm_fp8_sm90.argtypes = [c_int, c_void_p, c_long, c_void_p, c_void_p, c_long, c_void_p, c_long,
                                               c_void_p, c_void_p, c_void_p, c_int, c_int, c_int, c_int, c_void_p]
    L.rtlynx_sparse_gemm_fp8_sm90.restype = c_int
    L.rtlynx_sparse_gemm_fp8_sm90_num_configs.restype = c_int
    L.rtlynx_sparse_gemm_fp8_sm90_config_name.argtypes = [c_int]
    L.rtlynx_sparse_gemm_fp8_sm90_config_name.restype = ctypes.c_char_p
    return L


def config_names() -> list[str]:
    L = _library()
    return [L.rtlynx_sparse_gemm_fp8_sm90_config_name(i).decode()
            for i in range(L.rtlynx_sparse_gemm_fp8_sm90_num_configs())]


def choose_config(m: int, n: int, kg: int) -> tuple[int, int]:
    """(config id, sched) for an FP8 sparse GEMM of M x N x Kg: ``RTLYNX_FP8_CONFIG`` (name or id[:sched]), the
    measured table, else a heuristic (large tiles for large problems, tile K 256 only where Kg % 256 == 0)."""
    env = os.environ.get("RTLYNX_FP8_CONFIG")
    if env:
        name, _, sched = env.partition(":")
        cid = int(name) if name.isdigit() else CONFIG_NAMES.index(name)
        if kg % TILE_K[CONFIG_NAMES[cid]] == 0:
            return cid, int(sched or 0)
    hit = CONFIG_TABLE.get((m, n, kg))
    if hit is not None and kg % TILE_K[hit[0]] == 0:
        return CONFIG_NAMES.index(hit[0]), hit[1]
    if m >= 2048 and n >= 1024:
        return CONFIG_NAMES.index("f8_t128x256x128_coop_c2x1"), 0
    return CONFIG_NAMES.index("f8_t128x128x128_coop_c2x1"), 0


@functools.lru_cache(maxsize=4096)
def _config(m: int, n: int, kg: int) -> tuple[int, int]:
    config, sched = choose_config(m, n, kg)
    return config, sched | (1 << 16) if PDL else sched


def _rows16(x: torch.Tensor) -> torch.Tensor:
    """x, or a row-major copy where the prune could not read it in 16-byte runs of rows."""
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)
    return x


def _prune_impl(x, norm, eps, act=0):
    x = _rows16(x)
    m, k = x.shape
    mp, kp = padded_shape(m, k)
    values = torch.empty(m, kp // 2, dtype=FP8, device=x.device)
    meta = torch.empty(mp * kp // 8, dtype=torch.uint8, device=x.device)
    rs, sx, s = (torch.empty(m, dtype=torch.float32, device=x.device) for _ in range(3))
    if m == 0:
        return values, meta.zero_(), rs, sx, s
    rc = _library().rtlynx_prune_quant_fp8_sm90(
        _DT[x.dtype], int(act), x.data_ptr(), x.stride(0), m, k, values.data_ptr(), values.stride(0), meta.data_ptr(),
        rs.data_ptr(), sx.data_ptr(), s.data_ptr(), int(norm), float(eps), _stream())
    _lib.check(rc, "prune_quant_fp8_sm90")
    return values, meta, rs, sx, s


def _prune_op(x, norm, eps, act=0):
    _checks.check_fp8_activation(x, act)
    return _prune_impl(x, norm, eps, act)


_LIB.impl("prune_quant_fp8_sm90", _prune_op, "CUDA")
prune_quant_fp8_sm90 = torch.ops.rtlynx.prune_quant_fp8_sm90.default


@torch.library.register_fake("rtlynx::prune_quant_fp8_sm90", lib=_LIB)
def _(x, norm, eps, act=0):
    _checks.check_fp8_activation(x, act)
    m, k = x.shape
    mp, kp = padded_shape(m, k)
    f = x.new_empty(m, dtype=torch.float32)
    return (x.new_empty(m, kp // 2, dtype=FP8), x.new_empty(mp * kp // 8, dtype=torch.uint8), f, f.clone(), f.clone())


def _gemm_impl(values, meta, wq, rs, sw, bias, config=-1, sched=0):
    m = values.shape[0]
    n, kg = wq.shape
    y = torch.empty(m, n, dtype=torch.bfloat16, device=values.device)
    if m == 0:
        return y
    if config < 0:
        config, sched = _config(m, n, kg)
    rc = _library().rtlynx_sparse_gemm_fp8_sm90(
        config, values.data_ptr(), values.stride(0), meta.data_ptr(), wq.data_ptr(), wq.stride(0), y.data_ptr(),
        y.stride(0), rs.data_ptr(), sw.data_ptr(), _ptr(bias), m, n, kg, sched, _stream())
    _lib.check(rc, f"sparse_gemm_fp8_sm90[{CONFIG_NAMES[config] if 0 <= config < len(CONFIG_NAMES) else config}]")
    return y


def _gemm_op(values, meta, wq, rs, sw, bias, config=-1, sched=0):
    _checks.check_fp8_gemm(values, meta, wq, rs, sw, bias)
    if config >= len(CONFIG_NAMES) or (config >= 0 and wq.shape[1] % TILE_K[CONFIG_NAMES[config]]):
        raise _checks.Unsupported(f"config {config} is not one of the {len(CONFIG_NAMES)} compiled FP8 GEMM configs "
                                  f"or its tile K does not divide Kg={wq.shape[1]}")
    return _gemm_impl(values, meta, wq, rs, sw, bias, config, sched)


_LIB.impl("sparse_gemm_fp8_sm90", _gemm_op, "CUDA")
sparse_gemm_fp8_sm90 = torch.ops.rtlynx.sparse_gemm_fp8_sm90.default


@torch.library.register_fake("rtlynx::sparse_gemm_fp8_sm90", lib=_LIB)
def _(values, meta, wq, rs, sw, bias, config=-1, sched=0):
    _checks.check_fp8_gemm(values, meta, wq, rs, sw, bias)
    return values.new_empty(values.shape[0], wq.shape[0], dtype=torch.bfloat16)


def _site_impl(x, wq, sw, bias, splits, norm, eps, act=0, persistent=False):
    """One prune + quantise pass of x into scratch, then one FP8 GEMM per member on its row block of ``wq``
    (operands checked by the caller: _checks.check_fp8_site)."""
    x = _rows16(x)
    m, k = x.shape
    mp, kp = padded_shape(m, k)
    if m == 0:
        return [x.new_empty(0, n) for n in splits]
    L = _library()
    st = _stream()
    vbytes = _align(m * kp // 2)
    mbytes = _align(mp * kp // 8)
    scratch = _scratch(x.device, st, vbytes + mbytes + 4 * m, persistent)
    base = scratch.data_ptr()
    vptr, mptr, rptr = base, base + vbytes, base + vbytes + mbytes
    rc = L.rtlynx_prune_quant_fp8_sm90(_DT[x.dtype], int(act), x.data_ptr(), x.stride(0), m, k, vptr, kp // 2, mptr,
                                       rptr, None, None, int(norm), float(eps), st)
    _lib.check(rc, "FP8 site prune")
    ldw = wq.stride(0)
    wptr, swptr, bptr = wq.data_ptr(), sw.data_ptr(), _ptr(bias)
    outs, off = [], 0
    for n in splits:
        y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
        config, sched = _config(m, n, kp)
        rc = L.rtlynx_sparse_gemm_fp8_sm90(config, vptr, kp // 2, mptr, wptr + off * ldw, ldw, y.data_ptr(), n, rptr,
                                           swptr + 4 * off, None if bptr is None else bptr + 2 * off, m, n, kp, sched,
                                           st)
        _lib.check(rc, f"FP8 site GEMM [{CONFIG_NAMES[config]}]")
        outs.append(y)
        off += n
    return outs


def _site_op_impl(x, wq, sw, bias, splits, norm, eps, act=0):
    _checks.check_fp8_site(x, wq, sw, bias, splits, act)
    return _site_impl(x, wq, sw, bias, list(splits), norm, eps, act)


_LIB.impl("fp8_site_sm90", _site_op_impl, "CUDA")
fp8_site_sm90 = torch.ops.rtlynx.fp8_site_sm90.default


@torch.library.register_fake("rtlynx::fp8_site_sm90", lib=_LIB)
def _(x, wq, sw, bias, splits, norm, eps, act=0):
    _checks.check_fp8_site(x, wq, sw, bias, splits, act)
    return [x.new_empty(x.shape[0], n) for n in splits]


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(wq [N, Kp] e4m3, sw [N] float32)`` for the FP8 GEMM (:func:`rtlynx.reference.fp8.quantize_weight_e4m3`,
    run on the weight's device)."""
    return quantize_weight_e4m3(weight)


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None = None,
               norm: bool = True, eps: float = 1e-8, act: int = 0) -> torch.Tensor:
    """The FP8 RT-Lynx linear (no LoRA) on ``x [M, K]`` bf16: one prune + quantise pass, one FP8 sparse GEMM."""
    return fp8_site_sm90(x, wq, sw, bias, [wq.shape[0]], norm, eps, act)[0]
