"""torch.library custom ops of the Hopper (sm_90a) lynx kernels, with fake (meta) implementations.

Notation: M tokens, K in-features, N out-features, r LoRA rank; Mp = round_up(M, 64), Kp = round_up(K, 128),
rp = round_up(r, 64) (0 without LoRA), Kg = Kp + 2 rp (the GEMM's logical K).

- ``rtlynx::prune_compress_sm90(x [M,K], h [M,r]?, norm, eps) -> (values [M, Kg/2], meta [Mp*Kg/8] u8, scale [M] f32)``
  2:4 prune + compress along K in the sm90 layout (rtlynx.reference.sm90) + the per-token norm scale;
  with ``h`` the LoRA tail h/s is appended (see csrc/rtlynx_sm90.h).
- ``rtlynx::gelu_prune_compress_sm90(h [M,K], norm, eps, dense) -> (values, meta, scale, y)``
  producer-fused variant for the MLP down-projection: the same outputs for x = GELU_tanh(h)
  (rtlynx.reference.sm90.gelu_compress_sm90) computed on the fly, plus the dense x as ``y [M,K]`` when ``dense``
  (``y`` is ``[0, K]`` otherwise). No LoRA tail.
- ``rtlynx::sparse_gemm_sm90(values, meta, weight [N,Kg], scale?, bias?, config) -> y [M,N]``
  y = scale[m] * (X~ @ W^T) + bias, wgmma.sp (CUTLASS 3.x), fp32 accumulation, epilogue fused.
- ``rtlynx::sparse_linear_sm90(x, weight [N,K], bias?, lora_a [r,K]?, lora_b [N,r]?, norm, eps) -> y [M,N]``
  the whole RT-Lynx linear: h = x A^T (cuBLAS), prune+compress (+tail), sparse GEMM with [W | B-expanded].
- ``rtlynx::sparse_site_sm90(x [M,K], wext [N,Kg], bias?, lora_a [rp,K]?, splits, norm, eps) -> [y_i [M,N_i]]``
  one activation site (rtlynx.sites): x pruned and compressed once (+ the LoRA tail of h = x lora_a^T), then one
  sparse GEMM per member on its row block of the operand the caller owns (the site's concatenated
  ``[W | B-expanded]``, row stride Kg or more, no copy); every member's output is a contiguous tensor of its own.
  ``lora_a`` has rp = round_up(r, 64) rows. The compressed activation lives in a per-stream scratch buffer.
- ``rtlynx::gelu_site_sm90(h [M,K], wext [N,Kp], bias?, norm, eps) -> y [M,N]``: a site whose producer is
  GELU-tanh: the GELU runs inside the prune pass.

Every op checks its operands (:mod:`rtlynx.ops._checks`: shapes, dtypes, devices, strides, alignment) before a raw
address reaches a kernel, in its CUDA implementation and in its fake (so a traced call fails at trace time too);
the internal calls (``_prune_impl``, ``_gemm_impl``, ``_site_impl``) take operands their callers checked.

Inference only (no autograd formulas). The ops are opaque to torch.compile and capture in CUDA graphs
(no host syncs, no allocations outside the caching allocator, launches on the current stream).
"""

from __future__ import annotations

import functools
import os
import threading
import weakref

import torch

from ..reference.sm90 import expand_lora_b, padded_shape, round_up
from . import _checks, _lib

_DTYPES = {torch.bfloat16: 0, torch.float16: 1}

# Low-level registration (torch.library.Library + register_fake) rather than @custom_op: same schema, fake,
# opcheck and torch.compile behaviour, but ~4x less host overhead per call (measured on the CPU: 10 vs 39 us),
# which matters in eager mode for the 20-60 us layers.
_LIB = torch.library.Library("rtlynx", "FRAGMENT")
_LIB.define("prune_compress_sm90(Tensor x, Tensor? h, bool norm, float eps) -> (Tensor, Tensor, Tensor)")
_LIB.define("gelu_prune_compress_sm90(Tensor h, bool norm, float eps, bool dense=False) "
            "-> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define("sparse_gemm_sm90(Tensor values, Tensor meta, Tensor weight, Tensor? scale, Tensor? bias, "
            "int config=-1, int sched=0) -> Tensor")
_LIB.define("sparse_linear_sm90(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_a, Tensor? lora_b, bool norm, "
            "float eps) -> Tensor")
_LIB.define("sparse_site_sm90(Tensor x, Tensor wext, Tensor? bias, Tensor? lora_a, int[] splits, bool norm, float eps) "
            "-> Tensor[]")
_LIB.define("gelu_site_sm90(Tensor h, Tensor wext, Tensor? bias, bool norm, float eps) -> Tensor")


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ----------------------------------------------------------------------------------------------- configs
# Config ids are positions in csrc/gen_configs.py's CONFIGS (csrc/sparse_gemm_sm90_dispatch.cu).
CONFIG_NAMES = (
    "t128x128_coop_c2x1",
    "t256x128_coop_c1x2",
    "t128x256_coop_c2x1",
    "t128x128_pp_c1x2",
    "t256x128_coop_c2x1",
    "t256x128_coop_c1x1",
)
# (M, N, Kg) -> (config name, sched), measured on H100 by benchmarks/linear.py --sweep (benchmarks/NOTES.md).
# sched = max_swizzle_size | raster << 8 (raster 0 heuristic, 1 along M, 2 along N); 0 = CUTLASS defaults.
# v2 sweep (benchmarks/results/v2, H100 80GB HBM3, quick timings; sched 257/513 = swizzle 1, raster M/N; 260 =
# swizzle 4, raster M). Differences under ~3 % between the 256x128 variants are within run-to-run noise.
CONFIG_TABLE: dict[tuple[int, int, int], tuple[str, int]] = {
    (512, 3072, 3072): ("t128x128_coop_c2x1", 0),
    (512, 3072, 4096): ("t128x128_coop_c2x1", 0),
    (512, 3072, 12288): ("t128x128_coop_c2x1", 0),
    (512, 12288, 3072): ("t128x128_coop_c2x1", 0),
    (4096, 64, 3072): ("t128x128_coop_c2x1", 0),
    (4096, 3072, 128): ("t256x128_coop_c1x2", 260),
    (4096, 3072, 3072): ("t256x128_coop_c2x1", 0),
    (4096, 3072, 12288): ("t256x128_coop_c1x1", 0),
    (4096, 3840, 128): ("t256x128_coop_c1x2", 260),
    (4096, 3840, 3840): ("t256x128_coop_c1x2", 0),
    (4096, 3840, 10240): ("t256x128_coop_c1x2", 0),
    (4096, 10240, 3840): ("t256x128_coop_c1x2", 0),
    (4096, 12288, 3072): ("t256x128_coop_c1x2", 0),
    (4224, 64, 3840): ("t128x128_coop_c2x1", 0),
    (4224, 3840, 3840): ("t256x128_coop_c1x2", 257),
    (4224, 3840, 10240): ("t256x128_coop_c1x2", 513),
    (4224, 10240, 3840): ("t256x128_coop_c2x1", 0),
    (4608, 3072, 3072): ("t256x128_coop_c1x1", 0),
    (4608, 3072, 15360): ("t256x128_coop_c1x2", 0),
    (4608, 12288, 3072): ("t256x128_coop_c1x2", 0),
}


def choose_config(m: int, n: int, k: int) -> tuple[int, int]:
    """(config id, sched) for a GEMM of M x N x Kg: the measured table first, else a heuristic.

    Heuristic (v1 sweep on H100): 256 x 128 tiles, cluster 1x2, win by 15-25 % on every shape with M >= 4096
    and N >= 3072; for few tiles (small M or N) the 128 x 128 tile with cluster 2x1 wastes least."""
    env = os.environ.get("RTLYNX_SM90_CONFIG")
    if env:
        name, _, sched = env.partition(":")
        return (int(name) if name.isdigit() else CONFIG_NAMES.index(name)), int(sched or 0)
    hit = CONFIG_TABLE.get((m, n, k)) or CONFIG_TABLE.get((m, n, k - 128))  # k - 128: same GEMM + LoRA tail
    if hit is not None:
        return CONFIG_NAMES.index(hit[0]), hit[1]
    if m >= 2048 and n >= 1024:
        return CONFIG_NAMES.index("t256x128_coop_c1x2"), 0
    return CONFIG_NAMES.index("t128x128_coop_c2x1"), 0


# ----------------------------------------------------------------------------------------------- prune
def _prune_impl(x, h, norm, eps):
    m, k = x.shape
    mp, kp = padded_shape(m, k)
    r = 0 if h is None else h.shape[1]
    if h is not None and r % 64:
        h = torch.nn.functional.pad(h, (0, 64 - r % 64))
        r = h.shape[1]
    kg = kp + 2 * r
    values = torch.empty(m, kg // 2, dtype=x.dtype, device=x.device)
    meta = torch.empty(mp * kg // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    rc = _lib.lib().rtlynx_prune_compress_sm90(
        _DTYPES[x.dtype], x.data_ptr(), x.stride(0), m, k, _ptr(h), 0 if h is None else h.stride(0), r,
        values.data_ptr(), values.stride(0), meta.data_ptr(), scale.data_ptr(), int(norm), float(eps), _stream())
    _lib.check(rc, "prune_compress_sm90")
    return values, meta, scale


def _prune_op(x, h, norm, eps):
    _checks.check_prune(x, h)
    return _prune_impl(x, h, norm, eps)


_LIB.impl("prune_compress_sm90", _prune_op, "CUDA")
prune_compress_sm90 = torch.ops.rtlynx.prune_compress_sm90.default


@torch.library.register_fake("rtlynx::prune_compress_sm90", lib=_LIB)
def _(x, h, norm, eps):
    _checks.check_prune(x, h)
    m, k = x.shape
    mp, kp = padded_shape(m, k)
    r = 0 if h is None else round_up(h.shape[1], 64)
    kg = kp + 2 * r
    return (x.new_empty(m, kg // 2), x.new_empty(mp * kg // 8, dtype=torch.uint8),
            x.new_empty(m, dtype=torch.float32))


def _gelu_prune_impl(h, norm, eps, dense=False):  # default: the dispatcher passes only given args
    _checks.check_prune(h, rows=False)  # (any strides: copied below if the kernel cannot read them)
    if h.stride(1) != 1 or h.stride(0) % 8 or h.data_ptr() % 16:  # the kernel reads 16-byte runs of rows
        h = h.clone(memory_format=torch.contiguous_format)
    m, k = h.shape
    mp, kp = padded_shape(m, k)
    values = torch.empty(m, kp // 2, dtype=h.dtype, device=h.device)
    meta = torch.empty(mp * kp // 8, dtype=torch.uint8, device=h.device)
    scale = torch.empty(m, dtype=torch.float32, device=h.device)
    y = torch.empty(m if dense else 0, k, dtype=h.dtype, device=h.device)
    L = _lib.lib()
    if not hasattr(L, "rtlynx_gelu_prune_compress_sm90"):
        raise RuntimeError("rtlynx gelu_prune_compress_sm90: the loaded library predates it "
                           "(rebuild it, or unset RTLYNX_LIB)")
    rc = L.rtlynx_gelu_prune_compress_sm90(
        _DTYPES[h.dtype], h.data_ptr(), h.stride(0), m, k, y.data_ptr() if dense else None, y.stride(0) if dense else 0,
        values.data_ptr(), values.stride(0), meta.data_ptr(), scale.data_ptr(), int(norm), float(eps), _stream())
    _lib.check(rc, "gelu_prune_compress_sm90")
    return values, meta, scale, y


_LIB.impl("gelu_prune_compress_sm90", _gelu_prune_impl, "CUDA")
gelu_prune_compress_sm90 = torch.ops.rtlynx.gelu_prune_compress_sm90.default


@torch.library.register_fake("rtlynx::gelu_prune_compress_sm90", lib=_LIB)
def _(h, norm, eps, dense=False):
    _checks.check_prune(h, rows=False)
    m, k = h.shape
    mp, kp = padded_shape(m, k)
    return (h.new_empty(m, kp // 2), h.new_empty(mp * kp // 8, dtype=torch.uint8),
            h.new_empty(m, dtype=torch.float32), h.new_empty(m if dense else 0, k))


# ----------------------------------------------------------------------------------------------- GEMM
# Launch the GEMM with programmatic dependent launch (overlaps its prologue with the prune kernel's tail).
PDL = os.environ.get("RTLYNX_PDL", "1") != "0"


def _gemm_impl(values, meta, weight, scale, bias, config=-1, sched=0):  # defaults: the dispatcher passes only given args
    m = values.shape[0]
    n, kg = weight.shape
    y = torch.empty(m, n, dtype=values.dtype, device=values.device)
    if config < 0:
        config, sched = choose_config(m, n, kg)
    if PDL:
        sched |= 1 << 16
    rc = _lib.lib().rtlynx_sparse_gemm_sm90(
        config, _DTYPES[values.dtype], values.data_ptr(), values.stride(0), meta.data_ptr(), weight.data_ptr(),
        weight.stride(0), y.data_ptr(), y.stride(0), _ptr(scale), _ptr(bias), m, n, kg, sched, _stream())
    _lib.check(rc, f"sparse_gemm_sm90[{CONFIG_NAMES[config] if 0 <= config < len(CONFIG_NAMES) else config}]")
    return y


def _gemm_op(values, meta, weight, scale, bias, config=-1, sched=0):
    _checks.check_gemm(values, meta, weight, scale, bias)
    if config >= len(CONFIG_NAMES):
        raise _checks.Unsupported(f"config {config} is not one of the {len(CONFIG_NAMES)} compiled GEMM configs")
    return _gemm_impl(values, meta, weight, scale, bias, config, sched)


_LIB.impl("sparse_gemm_sm90", _gemm_op, "CUDA")
# config = -1: per-shape choice (choose_config), else a config id with scheduler options sched
sparse_gemm_sm90 = torch.ops.rtlynx.sparse_gemm_sm90.default


@torch.library.register_fake("rtlynx::sparse_gemm_sm90", lib=_LIB)
def _(values, meta, weight, scale, bias, config=-1, sched=0):
    _checks.check_gemm(values, meta, weight, scale, bias)
    return values.new_empty(values.shape[0], weight.shape[0])


# ----------------------------------------------------------------------------------------------- linear
class _WeightCache:
    """[W | B-expanded] per (weight, lora_b) pair, rebuilt when either is modified in place, dropped with the
    weight or with its lora_b (both keyed weakly by the tensor objects themselves, so freed memory that is
    reused cannot alias a new tensor, and a LoRA replaced by a new one frees its copy at once). Holds one
    extra copy of W per live LoRA layer (or K % 128 != 0): pass a prepared weight via :func:`prepare_weight`
    to ``sparse_gemm_sm90`` to avoid it."""

    def __init__(self):
        # id(weight) -> (weakref to weight, {sub key: (version, wext, weakref to lora_b or None)})
        self._d: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def _drop(self, key):
        with self._lock:
            e = self._d.get(key)
            if e is not None and e[0]() is None:
                del self._d[key]

    def _drop_sub(self, key, sub):
        with self._lock:
            e = self._d.get(key)
            if e is not None and sub in e[1] and e[1][sub][2] is not None and e[1][sub][2]() is None:
                del e[1][sub]

    def entries(self) -> int:
        """Cached operands alive (for tests and memory accounting)."""
        with self._lock:
            return sum(len(e[1]) for e in self._d.values())

    def get(self, weight: torch.Tensor, lora_b: torch.Tensor | None, k: int) -> torch.Tensor:
        sub = (k, None if lora_b is None else (id(lora_b), lora_b.data_ptr(), tuple(lora_b.shape)))
        ver = (weight._version, weight.data_ptr(), None if lora_b is None else lora_b._version)
        with self._lock:
            e = self._d.get(id(weight))
            hit = e[1].get(sub) if e is not None and e[0]() is weight else None
        if hit is not None and hit[0] == ver and (hit[2] is None or hit[2]() is lora_b):
            return hit[1]
        wext = expand_lora_b(weight, lora_b, k)
        with self._lock:
            e = self._d.get(id(weight))
            if e is None or e[0]() is not weight:
                e = (weakref.ref(weight), {})
                self._d[id(weight)] = e
                weakref.finalize(weight, self._drop, id(weight))
            for old in [s_ for s_, v in e[1].items() if v[2] is not None and v[2]() is None]:
                del e[1][old]  # LoRAs that are gone
            if len(e[1]) > 4:  # a weight seen with many different live lora_b: keep the newest few
                e[1].clear()
            ref = None
            if lora_b is not None:
                ref = weakref.ref(lora_b)
                weakref.finalize(lora_b, self._drop_sub, id(weight), sub)
            e[1][sub] = (ver, wext, ref)
        return wext

    def clear(self):
        with self._lock:
            self._d.clear()


WEIGHT_CACHE = _WeightCache()


def prepare_weight(weight: torch.Tensor, lora_b: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMM operand ``[N, Kg]`` (``Kg = round_up(K,128) + 2 round_up(r,64)``) for ``sparse_gemm_sm90``."""
    return expand_lora_b(weight, lora_b, weight.shape[1])


def _linear_impl(x, weight, bias, lora_a, lora_b, norm, eps):
    k = x.shape[1]
    use_lora = lora_a is not None and lora_b is not None
    if _checks.weight_in_place(k, weight, lora_a if use_lora else None):
        wext = weight
    else:
        wext = WEIGHT_CACHE.get(weight, lora_b if use_lora else None, k)
    h = torch.nn.functional.linear(x, lora_a.to(x.dtype)) if use_lora else None
    values, meta, scale = _prune_impl(x, h, norm, eps)  # plain calls: no nested op dispatch overhead
    return _gemm_impl(values, meta, wext, scale if norm else None, bias, -1, 0)


def _linear_op(x, weight, bias, lora_a, lora_b, norm, eps):
    _checks.check_linear(x, weight, bias, lora_a, lora_b)
    return _linear_impl(x, weight, bias, lora_a, lora_b, norm, eps)


_LIB.impl("sparse_linear_sm90", _linear_op, "CUDA")
sparse_linear_sm90 = torch.ops.rtlynx.sparse_linear_sm90.default


@torch.library.register_fake("rtlynx::sparse_linear_sm90", lib=_LIB)
def _(x, weight, bias, lora_a, lora_b, norm, eps):
    _checks.check_linear(x, weight, bias, lora_a, lora_b)
    return x.new_empty(x.shape[0], weight.shape[0])


# ----------------------------------------------------------------------------------------------- sites
_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}  # (device, stream) -> bytes for the compressed activation


def _scratch(device: torch.device, stream: int, nbytes: int, persistent: bool) -> torch.Tensor:
    """``nbytes`` of scratch for one prune -> GEMM hand-off on ``stream`` (keep the returned tensor alive until the
    kernels are launched). Eager calls (``persistent``): kernels on one stream run in order, so one buffer per stream
    serves every site and saves an allocation per call. Traced calls (the op under torch.compile) and CUDA-graph
    capture take a fresh allocation, freed when the op returns: torch.compile's CUDA-graph trees refuse memory of
    their pool held past the op (also when allocated during their warm-up run), and a buffer that grows must never
    free memory a captured graph replays."""
    if not persistent or torch.cuda.is_current_stream_capturing():
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    key = (device.index if device.index is not None else torch.cuda.current_device(), stream)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1 << 20) * 5 // 4, dtype=torch.uint8, device=device)
        _SCRATCH[key] = buf
    return buf


def _align(v: int) -> int:
    return (v + 255) // 256 * 256


@functools.lru_cache(maxsize=4096)
def _config(m: int, n: int, kg: int) -> tuple[int, int]:
    """choose_config + the PDL flag, once per shape (RTLYNX_SM90_CONFIG is read at a shape's first site call)."""
    config, sched = choose_config(m, n, kg)
    return config, sched | (1 << 16) if PDL else sched


def _site_impl(x, wext, bias, lora_a, splits, norm, eps, act=0, persistent=False):
    """One prune pass of x (act 0) or of GELU_tanh(x) (act 1) into scratch, then one GEMM per member.
    ``persistent``: use the per-stream scratch buffer (eager calls only, see :func:`_scratch`). The library is
    called with raw addresses (operand row blocks, scratch offsets) rather than through _prune_impl / _gemm_impl:
    no tensor views or allocations besides the outputs, which is most of a site's host cost."""
    m, k = x.shape
    mp, kp = padded_shape(m, k)
    L = _lib.lib()
    st = _stream()
    dt = _DTYPES[x.dtype]
    h = torch.nn.functional.linear(x, lora_a) if lora_a is not None else None
    r = 0 if h is None else h.shape[1]
    kg = kp + 2 * r
    vbytes = _align(m * kg)  # m x kg/2 16-bit values
    mbytes = _align(mp * kg // 8)
    scratch = _scratch(x.device, st, vbytes + mbytes + 4 * m, persistent)  # alive until the launches are enqueued
    base = scratch.data_ptr()
    vptr, mptr, sptr = base, base + vbytes, base + vbytes + mbytes
    if act == 0:
        rc = L.rtlynx_prune_compress_sm90(dt, x.data_ptr(), x.stride(0), m, k, _ptr(h), 0 if h is None else h.stride(0),
                                          r, vptr, kg // 2, mptr, sptr, int(norm), float(eps), st)
    else:
        rc = L.rtlynx_gelu_prune_compress_sm90(dt, x.data_ptr(), x.stride(0), m, k, None, 0, vptr, kg // 2, mptr, sptr,
                                               int(norm), float(eps), st)
    _lib.check(rc, "site prune")
    ldw = wext.stride(0)
    esize = wext.element_size()
    wptr, bptr = wext.data_ptr(), _ptr(bias)
    outs, off = [], 0
    for n in splits:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        config, sched = _config(m, n, kg)
        rc = L.rtlynx_sparse_gemm_sm90(config, dt, vptr, kg // 2, mptr, wptr + off * ldw * esize, ldw, y.data_ptr(), n,
                                       sptr if norm else None, None if bptr is None else bptr + off * esize, m, n, kg,
                                       sched, st)
        _lib.check(rc, f"site GEMM [{CONFIG_NAMES[config]}]")
        outs.append(y)
        off += n
    return outs


def _site_op_impl(x, wext, bias, lora_a, splits, norm, eps):
    _checks.check_site(x, wext, bias, lora_a, splits)
    _checks.check_rows(x, "x", x, None, x.shape[1])
    return _site_impl(x, wext, bias, lora_a, list(splits), norm, eps)


_LIB.impl("sparse_site_sm90", _site_op_impl, "CUDA")
sparse_site_sm90 = torch.ops.rtlynx.sparse_site_sm90.default


@torch.library.register_fake("rtlynx::sparse_site_sm90", lib=_LIB)
def _(x, wext, bias, lora_a, splits, norm, eps):
    _checks.check_site(x, wext, bias, lora_a, splits)
    return [x.new_empty(x.shape[0], n) for n in splits]


def _gelu_site_op_impl(h, wext, bias, norm, eps, persistent=False):
    if h.stride(1) != 1 or h.stride(0) % 8 or h.data_ptr() % 16:  # the kernel reads 16-byte runs of rows
        h = h.clone(memory_format=torch.contiguous_format)
    return _site_impl(h, wext, bias, None, [wext.shape[0]], norm, eps, act=1, persistent=persistent)[0]


def _gelu_site_op(h, wext, bias, norm, eps):
    _checks.check_site(h, wext, bias, None, [wext.shape[0]])
    return _gelu_site_op_impl(h, wext, bias, norm, eps)


_LIB.impl("gelu_site_sm90", _gelu_site_op, "CUDA")
gelu_site_sm90 = torch.ops.rtlynx.gelu_site_sm90.default


@torch.library.register_fake("rtlynx::gelu_site_sm90", lib=_LIB)
def _(h, wext, bias, norm, eps):
    _checks.check_site(h, wext, bias, None, [wext.shape[0]])
    return h.new_empty(h.shape[0], wext.shape[0])
