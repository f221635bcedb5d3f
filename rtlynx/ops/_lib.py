"""ctypes binding of librtlynx_sm90 (csrc/rtlynx_sm90.h). Loaded lazily, once; never at import of rtlynx.

A failed build or load (nvcc missing or failing, a damaged ``RTLYNX_LIB``...) raises :class:`LibraryUnavailable`
with the cause and the build log, and is remembered: later calls raise the same at once, and
``rtlynx.ops.lynx_status`` reports it, so the backends fall back instead of rebuilding on every call."""

from __future__ import annotations

import ctypes
import os
import threading

from ._checks import LibraryUnavailable

_LOCK = threading.Lock()
_LIB = None
_FAILURE: str | None = None  # why the library could not be built / loaded in this process

ERRORS = {
    -1: "bad shapes or alignment",
    -2: "CUTLASS can_implement refused the problem",
    -3: "CUTLASS initialize failed",
    -4: "CUTLASS kernel launch failed",
    -5: "kernel would need a workspace",
    -6: "unknown config or dtype",
}

c_int, c_long, c_float, c_void_p = ctypes.c_int, ctypes.c_long, ctypes.c_float, ctypes.c_void_p


def _declare(lib):
    lib.rtlynx_prune_compress_sm90.argtypes = [
        c_int, c_void_p, c_long, c_int, c_int, c_void_p, c_long, c_int, c_void_p, c_long, c_void_p, c_void_p,
        c_int, c_float, c_void_p]
    lib.rtlynx_prune_compress_sm90.restype = c_int
    if hasattr(lib, "rtlynx_gelu_prune_compress_sm90"):  # absent from libraries built before the fused variant
        lib.rtlynx_gelu_prune_compress_sm90.argtypes = [
            c_int, c_void_p, c_long, c_int, c_int, c_void_p, c_long, c_void_p, c_long, c_void_p, c_void_p, c_int,
            c_float, c_void_p]
        lib.rtlynx_gelu_prune_compress_sm90.restype = c_int
    if hasattr(lib, "rtlynx_prune_compress_centred_sm90"):  # absent from libraries built before token-mean centring
        lib.rtlynx_prune_compress_centred_sm90.argtypes = [
            c_int, c_void_p, c_long, c_int, c_int, c_void_p, c_long, c_int, c_void_p, c_long, c_int, c_void_p, c_long,
            c_int, c_void_p, c_long, c_void_p, c_void_p, c_int, c_float, c_void_p]
        lib.rtlynx_prune_compress_centred_sm90.restype = c_int
    lib.rtlynx_sparse_gemm_sm90.argtypes = [
        c_int, c_int, c_void_p, c_long, c_void_p, c_void_p, c_long, c_void_p, c_long, c_void_p, c_void_p,
        c_int, c_int, c_int, c_int, c_void_p]
    lib.rtlynx_sparse_gemm_sm90.restype = c_int
    lib.rtlynx_prune_set_impl_sm90.argtypes = [c_int]
    lib.rtlynx_prune_set_impl_sm90.restype = c_int
    lib.rtlynx_sparse_gemm_sm90_num_configs.argtypes = []
    lib.rtlynx_sparse_gemm_sm90_num_configs.restype = c_int
    lib.rtlynx_sparse_gemm_sm90_config_name.argtypes = [c_int]
    lib.rtlynx_sparse_gemm_sm90_config_name.restype = ctypes.c_char_p
    lib.rtlynx_sparse_gemm_sm90_config_info.argtypes = [c_int, ctypes.POINTER(c_int), ctypes.POINTER(c_int)]
    lib.rtlynx_sparse_gemm_sm90_config_info.restype = c_int
    return lib


def failure() -> str | None:
    """Why the library could not be built or loaded in this process (None: not tried, or it loaded)."""
    return _FAILURE


def loaded() -> bool:
    return _LIB is not None


def reset() -> None:
    """Forget the loaded library and any remembered failure (tests; a fixed environment)."""
    global _LIB, _FAILURE
    with _LOCK:
        _LIB, _FAILURE = None, None


def _describe(e: Exception, prebuilt: str | None) -> str:
    if prebuilt:
        return f"RTLYNX_LIB={prebuilt} could not be loaded ({type(e).__name__}: {e})"
    from ._build import BuildError

    if isinstance(e, BuildError):
        log = f"; build log: {e.log}" if e.log else ""
        return f"the lynx kernels could not be built ({e}){log}"
    return f"the lynx kernel library could not be built or loaded ({type(e).__name__}: {e})"


def lib():
    """The loaded library; builds it (cached, with a progress bar on stderr) on first use. ``RTLYNX_LIB`` points
    at a prebuilt one. Raises :class:`LibraryUnavailable` (remembered for the process) when that fails."""
    global _LIB, _FAILURE
    if _LIB is not None:
        return _LIB
    with _LOCK:
        if _LIB is None:
            if _FAILURE is not None:
                raise LibraryUnavailable(_FAILURE)
            path = os.environ.get("RTLYNX_LIB")
            try:
                if not path:
                    from ._build import build

                    path_ = str(build(progress=True))
                else:
                    path_ = path
                _LIB = _declare(ctypes.CDLL(path_))
            except Exception as e:  # noqa: BLE001 - any failure here means "no kernels in this process"
                _FAILURE = _describe(e, path)
                raise LibraryUnavailable(_FAILURE) from e
    return _LIB


def check(rc: int, what: str) -> None:
    if rc == 0:
        return
    if rc > 0:
        raise RuntimeError(f"rtlynx {what}: CUDA error {rc}")
    raise RuntimeError(f"rtlynx {what}: {ERRORS.get(rc, rc)}")


def config_names() -> list[str]:
    L = lib()
    return [L.rtlynx_sparse_gemm_sm90_config_name(i).decode() for i in range(L.rtlynx_sparse_gemm_sm90_num_configs())]


def config_info(i: int) -> tuple[int, int]:
    smem, stages = c_int(), c_int()
    check(lib().rtlynx_sparse_gemm_sm90_config_info(i, ctypes.byref(smem), ctypes.byref(stages)), "config_info")
    return smem.value, stages.value


def set_prune_impl(impl: int) -> int:
    """Select the prune kernel (3 = default, 2 = the v2 kernel, for A/B tests); returns the previous one."""
    return lib().rtlynx_prune_set_impl_sm90(impl)
