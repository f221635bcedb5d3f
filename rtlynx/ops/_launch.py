"""What the ctypes launches of :mod:`rtlynx.ops.sm90` (bf16/fp16) and :mod:`rtlynx.ops.fp8` (e4m3) share: the
current stream, raw addresses, the per-stream scratch of a site's prune -> GEMM hand-off, the row-major copy the
prunes read, and the per-shape (config, sched) cache with the programmatic-dependent-launch flag."""

from __future__ import annotations

import functools
import os

import torch

# Launch the GEMMs with programmatic dependent launch (overlaps their prologue with the prune kernel's tail).
PDL = os.environ.get("RTLYNX_PDL", "1") != "0"
PDL_FLAG = 1 << 16  # in the GEMMs' sched argument


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def align(v: int) -> int:
    """``v`` bytes rounded up to 256 (each part of a site's scratch starts aligned)."""
    return (v + 255) // 256 * 256


def rows16(x: torch.Tensor) -> torch.Tensor:
    """x, or a row-major copy where a prune kernel could not read it in 16-byte runs of rows."""
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)
    return x


_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}  # (device, stream) -> bytes for the compressed activation


def scratch(device: torch.device, stream: int, nbytes: int, persistent: bool) -> torch.Tensor:
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


def config_cache(choose):
    """``(m, n, kg) -> (config id, sched)``: ``choose`` + the PDL flag, once per shape (so an environment override
    read by ``choose`` is read at a shape's first site call); ``.cache_clear()`` to re-read it."""

    @functools.lru_cache(maxsize=4096)
    def config(m: int, n: int, kg: int) -> tuple[int, int]:
        cid, sched = choose(m, n, kg)
        return cid, sched | PDL_FLAG if PDL else sched

    return config
