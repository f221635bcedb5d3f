"""rtlynx's GPU kernels behind torch.library ops, and the entry points ``SparseActLinear`` calls.

Public API (nothing CUDA is imported or built at import time):

- :func:`lynx_status` -> ``(ok, reason)``: can the Hopper lynx kernels run here? (cached)
- :func:`lynx_linear` (x2d, weight, bias, norm, lora_a, lora_b, n=2, m=4, eps=1e-8) -> y2d
- :func:`prune_compress` (x2d) -> (values, meta, scale) in the sm90 layout (rtlynx.reference.sm90)
- :func:`gelu_prune_compress` (h2d) -> the same for x = GELU_tanh(h2d), computed inside the prune pass
- :func:`lynx_gelu_linear` (h2d, weight, bias, norm) -> y2d: the MLP down-projection from its pre-activation
- :func:`fp8_site`: an activation site on the FP8 (e4m3) kernels (:mod:`rtlynx.ops.fp8`)
- :class:`Unsupported`: raised for inputs the kernels cannot run (the caller falls back with a warning); the operand
  checks live in :mod:`rtlynx.ops._checks` (one ``check_*`` per operand kind, for new ops to reuse).
- :class:`LibraryUnavailable` (an Unsupported): the kernel library could not be built or loaded; remembered for the
  process (``lynx_status`` then reports it, and nothing is rebuilt per call).

The ops themselves live in :mod:`rtlynx.ops.sm90` (``rtlynx::prune_compress_sm90``,
``rtlynx::gelu_prune_compress_sm90``, ``rtlynx::sparse_gemm_sm90``, ``rtlynx::sparse_linear_sm90``), registered at
import of rtlynx.ops (pure Python: the CUDA library is built/loaded at the first kernel call).
"""

from __future__ import annotations

import functools

import torch

from . import _lib
from . import sm90 as _sm90  # registers the torch.library ops; imports no CUDA and builds nothing
from . import fp8 as _fp8  # noqa: F401  the FP8 ops (rtlynx::prune_quant_fp8_sm90, ...), same rules
from ._checks import (LibraryUnavailable, Unsupported, check_activation, check_centre, check_devices, check_fp8_site,
                      check_linear, check_site)


@functools.lru_cache(maxsize=None)
def _status(device_index: int) -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) != (9, 0):
        return False, f"needs an sm_90 (Hopper) GPU, device {device_index} is sm_{major}{minor}"
    import os

    if os.environ.get("RTLYNX_LIB"):  # loading a prebuilt library is cheap: try it (a failure is remembered)
        try:
            _lib.lib()
        except LibraryUnavailable as e:
            return False, str(e)
        return True, "prebuilt library " + os.environ["RTLYNX_LIB"]
    from . import _build

    try:
        tc = _build.toolchain()  # runs nvcc --version: a path that exists is not yet a compiler
    except _build.BuildError as e:
        return False, f"{e} (needed to build the kernels once)"
    built = _build.cached_library(tc)
    if built is not None:
        return True, f"sm_90 GPU, kernels built ({built})"
    return True, (f"sm_90 GPU, kernels not built yet (nvcc {tc['nvcc_version']}, CUTLASS {tc['cutlass_version']}): "
                  "the first kernel call builds them (1-2 min, once), or run `rtlynx build`")


def lynx_status(device_index: int | None = None) -> tuple[bool, str]:
    """Whether the lynx kernels can run on CUDA device ``device_index`` (default: the current one), and
    why not. Cheap, cached."""
    failed = _lib.failure()
    if failed is not None:  # a build / load that failed in this process is not retried
        return False, failed
    if not torch.cuda.is_available():
        return _status(-1)
    return _status(torch.cuda.current_device() if device_index is None else device_index)


def _check_device(index: int | None) -> None:
    """The kernels can run on CUDA device ``index`` and the library is loaded (built on first use)."""
    failed = _lib.failure()
    if failed is not None:
        raise LibraryUnavailable(failed)
    ok, why = _status(index)  # cached per device (no driver query on the hot path)
    if not ok:
        raise (Unsupported if _lib.failure() is None else LibraryUnavailable)(why)
    _lib.lib()  # LibraryUnavailable (an Unsupported) if the build or load fails


def _check_x(x2d: torch.Tensor) -> None:
    check_activation(x2d)
    if x2d.device.type == "cuda" and not torch.compiler.is_compiling():
        _check_device(x2d.device.index if x2d.device.index is not None else torch.cuda.current_device())


def prune_compress(x2d: torch.Tensor, eps: float = 1e-8):
    """2:4 prune + compress of ``x2d [M, K]`` along K: ``(values [M, Kp/2], meta [Mp*Kp/8] uint8, scale [M] f32)``
    in the sm90 layout (see rtlynx.reference.sm90; K % 8 == 0 required here)."""
    _check_x(x2d)  # the device; the op checks the operands
    return _sm90.prune_compress_sm90(x2d.contiguous(), None, True, eps)


def sparse_gemm(values: torch.Tensor, meta: torch.Tensor, wext: torch.Tensor, scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = scale * (X~ @ W^T) + bias`` from the compressed X of :func:`prune_compress` (its own scale, or one computed
    elsewhere: the tensor-parallel norm scale, rtlynx.parallel); ``wext [N, Kp]`` padded as a site's operand
    (row stride >= Kp), ``scale [M]`` float32 or None."""
    return _sm90.sparse_gemm_sm90(values, meta, wext, scale, bias, -1, 0)


def gelu_prune_compress(h2d: torch.Tensor, eps: float = 1e-8, dense: bool = False):
    """Producer-fused prune: ``x = GELU_tanh(h2d)`` (float32, rounded once to h's dtype, as ``F.gelu(h,
    approximate="tanh")`` on CUDA) pruned + compressed in one pass over ``h2d [M, K]``:
    ``(values, meta, scale)`` in the sm90 layout, plus the dense ``x [M, K]`` when ``dense`` (for a LoRA branch).
    Reference: :func:`rtlynx.reference.sm90.gelu_compress_sm90`. K % 8 == 0 required."""
    _check_x(h2d)  # the device; the op checks the operands
    values, meta, scale, y = _sm90.gelu_prune_compress_sm90(h2d.contiguous(), True, eps, dense)
    return (values, meta, scale, y) if dense else (values, meta, scale)


def lynx_gelu_linear(h2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm: bool = True,
                     eps: float = 1e-8) -> torch.Tensor:
    """MLP down-projection from its pre-activation: ``y = s * (prune24(GELU_tanh(h)) @ W^T) + b`` with the GELU
    fused into the prune pass (no dense GELU output is written). weight [N, K] with K % 8 == 0, N % 8 == 0; no
    LoRA (a LoRA branch needs the dense GELU output: :func:`gelu_prune_compress` with ``dense=True``)."""
    _check_x(h2d)
    k = h2d.shape[1]
    if k % 8 or weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] % 8:
        raise Unsupported(f"lynx_gelu_linear needs h [M, K], weight [N, K] with K, N % 8 == 0; got "
                          f"{tuple(h2d.shape)}, {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise Unsupported(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_devices(h2d, weight=weight)  # before the copy below (the GEMM op checks the rest of its operands)
    dt = h2d.dtype
    if h2d.shape[0] == 0:
        return h2d.new_empty(0, weight.shape[0])
    wext = weight.to(dt).contiguous() if k % 128 == 0 else _sm90.WEIGHT_CACHE.get(weight.to(dt), None, k)
    h2d = h2d.contiguous()
    if torch.compiler.is_compiling() or not h2d.is_cuda:
        values, meta, scale, _ = _sm90.gelu_prune_compress_sm90(h2d, bool(norm), float(eps), False)
    else:  # h2d checked above (the prune op's check_prune): the implementation directly
        values, meta, scale, _ = _sm90._gelu_prune_impl(h2d, bool(norm), float(eps), False)
    return _sm90.sparse_gemm_sm90(values, meta, wext, scale if norm else None,
                                  None if bias is None else bias.to(dt).contiguous(), -1, 0)


def lynx_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm: bool,
                lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, n: int = 2, m: int = 4,
                eps: float = 1e-8) -> torch.Tensor:
    """``y = s * (prune24(x) @ W^T) + b + (x A^T) B^T`` on Hopper sparse tensor cores (s = 1 unless ``norm``).

    x2d [M, K] bf16/fp16 CUDA; weight [N, K]; bias [N] or None; lora_a [r, K] and lora_b [N, r] or None.
    Any M works (the kernels pad internally); K is padded to a multiple of 8 here if needed (a copy).
    Raises :class:`Unsupported` for what the kernels cannot run.
    """
    if (n, m) != (2, 4):
        raise Unsupported(f"lynx kernels run 2:4 only, got {n}:{m}")
    _check_x(x2d)
    mm, k = x2d.shape
    # checked here, not left to the op: after the K padding below the op would take a weight up to 7 columns short
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != k:
        raise Unsupported(f"weight must be [N, {k}], got {tuple(getattr(weight, 'shape', ()))}")
    if lora_a is not None and (not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 2 or lora_a.shape[1] != k):
        raise Unsupported(f"lora_a must be [r, {k}], got {tuple(getattr(lora_a, 'shape', ()))}")
    dt = x2d.dtype
    weight = weight.to(dt).contiguous()
    bias = None if bias is None else bias.to(dt).contiguous()
    x2d = x2d.contiguous()
    if k % 8:
        pad = 8 - k % 8
        x2d = torch.nn.functional.pad(x2d, (0, pad))
        if lora_a is not None:
            lora_a = torch.nn.functional.pad(lora_a, (0, pad))
    lora_a = None if lora_a is None else lora_a.to(dt).contiguous()
    lora_b = None if lora_b is None else lora_b.to(dt).contiguous()
    if mm == 0:  # nothing to launch: the op's checks alone
        check_linear(x2d, weight, bias, lora_a, lora_b)
        return x2d.new_empty(0, weight.shape[0])
    return _sm90.sparse_linear_sm90(x2d, weight, bias, lora_a, lora_b, bool(norm), float(eps))


def _check_site(x2d, wext, bias, lora_a, splits):
    _check_x(x2d)
    check_site(x2d, wext, bias, lora_a, splits)


def lynx_site_linear(x2d: torch.Tensor, wext: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor | None,
                     splits, norm: bool = True, eps: float = 1e-8, centre: torch.Tensor | None = None,
                     centre_rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One activation site (:mod:`rtlynx.sites`): ``y = s * (prune24(x) @ W^T) + b + (x A^T) B^T`` for the
    concatenated weights of every layer reading x: one prune pass, then one sparse GEMM per member on its row
    block; returns each member's output ``[M, N_i]`` (contiguous).

    ``wext [N, Kp + 2 rp]`` (row stride >= that) is the site's GEMM operand ``[W | 0 | B-expanded]``
    (``rtlynx.reference.sm90``: ``expand_lora_b``), owned by the caller and used as is; ``splits`` the members'
    N_i; ``lora_a [rp, K]`` (rp % 64 == 0, zero rows past r) or None; x2d [M, K] with K % 8 == 0.
    Token-mean centring (``SparsityConfig.centre``): ``centre`` float32 [B, K] (one per sample, the M rows B
    samples of consecutive tokens) and ``centre_rows`` [R, K] (its 2:4-exact rows, rtlynx.reference.centre_rows):
    the site runs on ``[x - c; centre_rows]``, x - c formed inside the prune kernel, and each output has M + R rows.
    Raises :class:`Unsupported` for what the kernels cannot run."""
    _check_site(x2d, wext, bias, lora_a, splits)
    check_centre(x2d, centre, centre_rows)
    if centre is not None:
        _sm90.centred_library()
    if x2d.shape[0] == 0:
        return [x2d.new_empty(0, n) for n in splits]
    return sparse_site(x2d.contiguous(), wext, bias, lora_a, splits, norm, eps, centre, centre_rows)


def sparse_site(x2d, wext, bias, lora_a, splits, norm: bool, eps: float, centre=None,
                centre_rows=None) -> list[torch.Tensor]:
    """:func:`lynx_site_linear` without its checks, for a caller that validated the same operands before. In eager
    mode the op's implementation is called directly (the dispatcher's Python round trip costs more host time than
    the small kernels); under torch.compile the op is traced, and meta tensors go to its fake."""
    if torch.compiler.is_compiling() or not x2d.is_cuda:
        return _sm90.sparse_site_sm90(x2d, wext, bias, lora_a, list(splits), bool(norm), float(eps), centre,
                                      centre_rows)
    return _sm90._site_impl(x2d, wext, bias, lora_a, splits, bool(norm), float(eps), persistent=True, centre=centre,
                            centre_rows=centre_rows)


def lynx_site_gelu(h2d: torch.Tensor, wext: torch.Tensor, bias: torch.Tensor | None, norm: bool = True,
                   eps: float = 1e-8, check: bool = True) -> torch.Tensor:
    """A site whose producer is GELU-tanh (an MLP down-projection read from its pre-activation h): the GELU is
    computed inside the prune pass, no dense GELU output is written. ``wext [N, Kp]`` (no LoRA)."""
    if check:
        _check_site(h2d, wext, bias, None, [wext.shape[0]])
    if h2d.shape[0] == 0:
        return h2d.new_empty(0, wext.shape[0])
    if torch.compiler.is_compiling() or not h2d.is_cuda:
        return _sm90.gelu_site_sm90(h2d, wext, bias, bool(norm), float(eps))
    return _sm90._gelu_site_op_impl(h2d, wext, bias, bool(norm), float(eps), persistent=True)


@torch.compiler.assume_constant_result
def centre_in_kernels(dtype: str = "native") -> bool:
    """Whether the kernel library (loaded, or built, here: a site asks only once its kernels can run) centres inside
    its prune (``SparsityConfig.dtype`` ``dtype``); libraries built before that run centred sites on ``[x - c; rows]``
    written out. False when there is no library."""
    try:
        _sm90.centred_library(fp8=dtype == "fp8")
    except Unsupported:  # LibraryUnavailable included
        return False
    return True


def fp8_site(x2d: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None, splits,
             norm: bool = True, eps: float = 1e-8, act: int = 0, check: bool = True, lora_a=None, lora_b=(),
             lora_terms=(), centre=None, centre_rows=None) -> list[torch.Tensor]:
    """An activation site on the FP8 kernels (:mod:`rtlynx.ops.fp8`): one prune + quantise pass of ``x2d [M, K]``
    (act 1: of GELU_tanh(x2d)), one FP8 sparse GEMM per member on its rows of ``wq [N, Kp]`` e4m3 with per-row
    scales ``sw [N]``, then the LoRA tail on the dense x (``lora_a [R, K]``; per term ``(i, c0, c1)`` of the flat
    ``lora_terms``, ``y_i += (x lora_a^T)[:, c0:c1] lora_b[t]^T``); bf16 only, K <= 16384. ``centre`` /
    ``centre_rows`` (act 0): token-mean centring as :func:`lynx_site_linear` (outputs of M + R rows). Raises
    :class:`Unsupported` for what the kernels cannot run (``check=False``: the caller validated the same operands
    before, as for :func:`sparse_site`)."""
    lora_b, lora_terms = list(lora_b), [int(v) for v in lora_terms]
    if check:  # once: the eager call below goes to the implementation, which does not check again
        _check_x(x2d)
        check_fp8_site(x2d, wq, sw, bias, splits, act, lora_a, lora_b, lora_terms)
        check_centre(x2d, centre, centre_rows, act)
        if centre is not None:
            _sm90.centred_library(fp8=True)
    if x2d.shape[0] == 0:
        return [x2d.new_empty(0, n) for n in splits]
    if torch.compiler.is_compiling() or not x2d.is_cuda:
        return _fp8.fp8_site_sm90(x2d, wq, sw, bias, list(splits), bool(norm), float(eps), int(act), lora_a,
                                  lora_b or None, lora_terms, centre, centre_rows)
    return _fp8._site_impl(x2d, wq, sw, bias, list(splits), bool(norm), float(eps), int(act), True, lora_a, lora_b,
                           lora_terms, centre, centre_rows)


__all__ = ["LibraryUnavailable", "Unsupported", "fp8_site", "lynx_site_gelu", "lynx_site_linear", "sparse_site", "gelu_prune_compress", "lynx_gelu_linear", "lynx_linear", "lynx_status", "prune_compress", "sparse_gemm"]
