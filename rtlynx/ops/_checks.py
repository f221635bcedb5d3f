"""Input checks of the lynx ops: one ``check_*`` per operand kind, raising :class:`Unsupported` with a one-line
reason before any raw address reaches a kernel. Shapes, dtypes, devices and strides only (no data is read), so
they also run on meta tensors (the ops' fakes call them: a wrong call fails at trace time too).

Layout facts (csrc/rtlynx_sm90.h): every 2-D operand is row-major (stride(1) == 1) with a row stride that is a
multiple of 8 elements (16 bytes) and a 16-byte aligned start, read in 16-byte runs."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


class Unsupported(RuntimeError):
    """The lynx kernels cannot run this call (device, dtype, pattern, shape); fall back to the reference."""


class LibraryUnavailable(Unsupported):
    """The kernel library could not be built or loaded; remembered for the process (no retry on every call)."""


def _where(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def check_tensor(t, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """``t`` is a tensor on ``like``'s device, of ``dtype`` (default: ``like``'s)."""
    if not isinstance(t, torch.Tensor):
        raise Unsupported(f"{name} must be a tensor, got {type(t).__name__}")
    dtype = like.dtype if dtype is None else dtype
    if t.device != like.device:
        raise Unsupported(f"{name} {_where(t)} is not on the input's device {like.device}")
    if t.dtype != dtype:
        raise Unsupported(f"{name} {_where(t)} must be {str(dtype).replace('torch.', '')}")


def check_aligned(t: torch.Tensor, name: str) -> None:
    """16-byte aligned start (eager CUDA tensors only: fakes have no address)."""
    if t.device.type == "cuda" and not torch.compiler.is_compiling() and t.data_ptr() % 16:
        raise Unsupported(f"{name} {_where(t)} does not start on a 16-byte boundary (a view at an odd offset?)")


def check_rows(t, name: str, like: torch.Tensor, rows: int | None, cols: int, dtype: torch.dtype | None = None) -> None:
    """A row-major matrix ``[rows, cols]`` (rows None: any) the kernels read in 16-byte runs: stride(1) == 1 and a
    row stride >= cols, a multiple of 8 elements; 16-byte aligned."""
    check_tensor(t, name, like, dtype)
    if t.dim() != 2 or (rows is not None and t.shape[0] != rows) or t.shape[1] != cols:
        raise Unsupported(f"{name} {_where(t)} must be [{'*' if rows is None else rows}, {cols}]")
    if (cols > 1 and t.stride(1) != 1) or (t.shape[0] > 1 and (t.stride(0) < cols or t.stride(0) % 8)):
        raise Unsupported(f"{name} {_where(t)} must be row-major with a row stride >= {cols} and a multiple of 8, "
                          f"got strides {t.stride()}")
    check_aligned(t, name)


def check_vector(t, name: str, like: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> None:
    """A contiguous ``[n]`` vector (bias, scale)."""
    check_tensor(t, name, like, dtype)
    if tuple(t.shape) != (n,) or not t.is_contiguous():
        raise Unsupported(f"{name} {_where(t)} must be a contiguous [{n}] vector")
    check_aligned(t, name)


def check_activation(x) -> None:
    """x [M, K] bf16/fp16 on CUDA (or meta, for tracing)."""
    if not isinstance(x, torch.Tensor):
        raise Unsupported(f"expected a tensor input, got {type(x).__name__}")
    if x.dim() != 2:
        raise Unsupported(f"expected a 2-D [M, K] input, got shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise Unsupported(f"lynx kernels take bf16/fp16 activations, got {x.dtype}")
    if x.device.type not in ("cuda", "meta"):
        raise Unsupported(f"lynx kernels need a CUDA tensor, got {x.device}")


def check_weight(w, name: str, like: torch.Tensor, cols: int, rows: int | None = None) -> None:
    """A GEMM weight operand ``[N, cols]`` in the activation's dtype, N a multiple of 8 (16-byte rows of Y)."""
    check_rows(w, name, like, rows, cols)
    if w.shape[0] % 8:
        raise Unsupported(f"{name} {_where(w)}: N must be a multiple of 8")


def check_meta(meta, values: torch.Tensor, kg: int) -> None:
    """sm90 metadata of ``values [M, Kg/2]``: uint8, contiguous, ``round_up(M, 64) * Kg / 8`` bytes."""
    need = (values.shape[0] + 63) // 64 * 64 * kg // 8
    check_tensor(meta, "meta", values, torch.uint8)
    if meta.dim() != 1 or meta.numel() != need or not meta.is_contiguous():
        raise Unsupported(f"meta {_where(meta)} must be a contiguous [{need}] vector (round_up(M, 64) * Kg / 8 "
                          f"for M={values.shape[0]}, Kg={kg})")
    check_aligned(meta, "meta")


def check_gemm(values, meta, weight, scale, bias) -> None:
    """Operands of ``rtlynx::sparse_gemm_sm90``: values [M, Kg/2], meta, weight [N, Kg] (Kg % 128 == 0),
    scale [M] float32 or None, bias [N] or None."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.dtype not in KERNEL_DTYPES:
        raise Unsupported(f"values must be a 2-D bf16/fp16 tensor, got "
                          f"{_where(values) if isinstance(values, torch.Tensor) else type(values).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise Unsupported("weight must be a 2-D tensor [N, Kg]")
    kg = weight.shape[1]
    if kg % 128 or kg == 0:
        raise Unsupported(f"weight {_where(weight)}: Kg must be a positive multiple of 128 (prepare_weight pads it)")
    check_rows(values, "values", values, None, kg // 2)
    check_weight(weight, "weight", values, kg)
    check_meta(meta, values, kg)
    if scale is not None:
        check_vector(scale, "scale", values, values.shape[0], torch.float32)
    if bias is not None:
        check_vector(bias, "bias", values, weight.shape[0])


__all__ = ["KERNEL_DTYPES", "LibraryUnavailable", "Unsupported", "check_activation", "check_aligned", "check_gemm",
           "check_meta", "check_rows", "check_tensor", "check_vector", "check_weight"]
