"""Input checks of the lynx ops: one ``check_*`` per operand kind, raising :class:`Unsupported` with a one-line
reason before any raw address reaches a kernel. Shapes, dtypes, devices and strides only (no data is read), so
they also run on meta tensors (the ops' fakes call them: a wrong call fails at trace time too).

Layout facts (csrc/rtlynx_sm90.h): every 2-D operand is row-major (stride(1) == 1) with a row stride that is a
multiple of 16 bytes (8 bf16 elements, 16 e4m3) and a 16-byte aligned start, read in 16-byte runs."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
FP8_MAX_K = 16384  # the FP8 prune keeps a row in registers


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


def check_devices(like: torch.Tensor, **tensors) -> None:
    """Every given tensor (None: skipped) is on ``like``'s device (a pointer into host memory would reach a kernel)."""
    for name, t in tensors.items():
        if t is not None and t.device != like.device:
            raise Unsupported(f"{name} {_where(t)} is not on the input's device {like.device}")


def check_aligned(t: torch.Tensor, name: str) -> None:
    """16-byte aligned start (real CUDA tensors only: meta and fake tensors have no address)."""
    if not t.is_cuda or torch.compiler.is_compiling():
        return
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # a FakeTensor (opcheck, tracing)
        return
    if ptr % 16:
        raise Unsupported(f"{name} {_where(t)} does not start on a 16-byte boundary (a view at an odd offset?)")


def check_rows(t, name: str, like: torch.Tensor, rows: int | None, cols: int, dtype: torch.dtype | None = None) -> None:
    """A row-major matrix ``[rows, cols]`` (rows None: any) the kernels read in 16-byte runs: stride(1) == 1 and a
    row stride >= cols, a multiple of 16 bytes; 16-byte aligned."""
    check_tensor(t, name, like, dtype)
    shape = t.shape  # (attributes read once: these checks sit on per-call paths)
    if len(shape) != 2 or (rows is not None and shape[0] != rows) or shape[1] != cols:
        raise Unsupported(f"{name} {_where(t)} must be [{'*' if rows is None else rows}, {cols}]")
    ld, inner = t.stride()
    align = 16 // t.element_size()
    if (cols > 1 and inner != 1) or (shape[0] > 1 and (ld < cols or ld % align)):
        raise Unsupported(f"{name} {_where(t)} must be row-major with a row stride >= {cols} and a multiple of "
                          f"{align}, got strides {t.stride()}")
    check_aligned(t, name)


def check_vector(t, name: str, like: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> None:
    """A contiguous ``[n]`` vector (bias, scale)."""
    check_tensor(t, name, like, dtype)
    if t.shape != (n,) or not t.is_contiguous():
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


def check_weight(w, name: str, like: torch.Tensor, cols: int, rows: int | None = None,
                 dtype: torch.dtype | None = None) -> None:
    """A GEMM weight operand ``[N, cols]`` of ``dtype`` (default: the activation's), N a multiple of 8 (16-byte rows
    of Y)."""
    check_rows(w, name, like, rows, cols, dtype)
    if w.shape[0] % 8:
        raise Unsupported(f"{name} {_where(w)}: N must be a multiple of 8")


def check_meta(meta, values: torch.Tensor, kg: int, min_rows: int = 0) -> None:
    """sm90 metadata of ``values [M, Kg/2]``: uint8, contiguous, ``round_up(max(M, min_rows), 64) * Kg / 8`` bytes."""
    need = (max(values.shape[0], min_rows) + 63) // 64 * 64 * kg // 8
    check_tensor(meta, "meta", values, torch.uint8)
    if meta.dim() != 1 or meta.numel() != need or not meta.is_contiguous():
        raise Unsupported(f"meta {_where(meta)} must be a contiguous [{need}] vector (round_up(M, 64) * Kg / 8 "
                          f"for M={values.shape[0]}, Kg={kg})")
    check_aligned(meta, "meta")


def check_prune(x, h=None, rows: bool = True) -> None:
    """Operands of ``rtlynx::prune_compress_sm90``: x [M, K] with K % 8 == 0, row-major (``rows``); h [M, r] or
    None."""
    check_activation(x)
    k = x.shape[1]
    if k % 8:
        raise Unsupported(f"x {_where(x)}: K must be a multiple of 8")
    if rows:
        check_rows(x, "x", x, None, k)
    if h is not None:
        check_tensor(h, "h", x)
        if h.dim() != 2 or h.shape[0] != x.shape[0]:
            raise Unsupported(f"h {_where(h)} must be [{x.shape[0]}, r]")
        if h.shape[1] % 64 == 0:  # used in place (else padded into a copy)
            check_rows(h, "h", x, x.shape[0], h.shape[1])


def weight_in_place(k: int, weight, lora_a) -> bool:
    """Whether ``rtlynx::sparse_linear_sm90`` hands ``weight`` to the GEMM as it is (else a padded copy with the
    LoRA tail, rtlynx.ops.sm90.WEIGHT_CACHE): K a multiple of 128, no LoRA, the weight as wide as x."""
    return k % 128 == 0 and lora_a is None and weight.shape[1] == k


def check_linear(x, weight, bias, lora_a, lora_b) -> None:
    """Operands of ``rtlynx::sparse_linear_sm90``: x [M, K] (K % 8 == 0), weight [N, K'] row-major (N % 8 == 0;
    K - 8 < K' <= K, x zero-padded),
    bias [N], lora_a [r, K] with lora_b [N, r] or neither; all in x's dtype, on x's device."""
    check_prune(x)
    k = x.shape[1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise Unsupported("weight must be a 2-D tensor [N, K]")
    n, kw = weight.shape
    if not k - 8 < kw <= k:  # x may carry up to 7 zero columns of padding to K % 8 == 0 (rtlynx.ops.lynx_linear)
        raise Unsupported(f"weight {_where(weight)} does not fit x {_where(x)}")
    if weight_in_place(k, weight, lora_a):
        check_weight(weight, "weight", x, kw)
    else:  # the GEMM reads a padded copy: any strides
        check_tensor(weight, "weight", x)
        if n % 8:
            raise Unsupported(f"weight {_where(weight)}: N must be a multiple of 8")
    if bias is not None:
        check_vector(bias, "bias", x, n)
    if (lora_a is None) != (lora_b is None):
        raise Unsupported("lora_a and lora_b must be given together")
    if lora_a is not None:
        check_tensor(lora_a, "lora_a", x)
        check_tensor(lora_b, "lora_b", x)
        if lora_a.dim() != 2 or lora_a.shape[1] != k or tuple(lora_b.shape) != (n, lora_a.shape[0]):
            raise Unsupported(f"LoRA shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not fit x "
                              f"{tuple(x.shape)} and weight {tuple(weight.shape)}")


def check_site(x, wext, bias, lora_a, splits) -> None:
    """Operands of an activation site (``rtlynx::sparse_site_sm90``, ``gelu_site_sm90``): x [M, K] with K % 8 == 0
    (any strides: the callers make it row-major);
    the operand wext [N, Kp + 2 rp] (Kp = round_up(K, 128), rp = lora_a's rows, a multiple of 64), row-major,
    in x's dtype; splits positive multiples of 8 summing to N; bias [N]; lora_a [rp, K]."""
    check_activation(x)
    k = x.shape[1]
    if k % 8:
        raise Unsupported(f"site K must be a multiple of 8, got K={k}")
    kp = (k + 127) // 128 * 128
    rp = 0 if lora_a is None else lora_a.shape[0]
    if not isinstance(wext, torch.Tensor) or wext.dim() != 2 or wext.shape[1] != kp + 2 * rp or rp % 64:
        raise Unsupported(f"site operand {_where(wext) if isinstance(wext, torch.Tensor) else wext!r} does not fit "
                          f"x {_where(x)} (LoRA rows {rp})")
    check_weight(wext, "site operand", x, kp + 2 * rp)
    if sum(splits) != wext.shape[0] or any(n <= 0 or n % 8 for n in splits):
        raise Unsupported(f"site splits {list(splits)} must be positive multiples of 8 summing to N={wext.shape[0]}")
    if bias is not None:
        check_vector(bias, "site bias", x, wext.shape[0])
    if lora_a is not None:
        check_tensor(lora_a, "site lora_a", x)
        if tuple(lora_a.shape) != (rp, k):
            raise Unsupported(f"site lora_a {_where(lora_a)} does not fit K={k}")


def _rows_apart(t, k: int) -> bool:
    """Rows that do not overlap (the kernels read each row as K values from its row start)."""
    return t.shape[0] <= 1 or t.stride(0) >= k


def check_centre(x, centre, centre_rows, act: int = 0) -> None:
    """Token-mean centring operands of a site op (both or neither): centre float32 [B, K] (one centre per sample, B
    dividing x's rows, M >= 1, unit stride along K, rows apart with a row stride that is a multiple of 4) and
    centre_rows [R, K] in x's dtype (the same, row stride a multiple of 8), both 16-byte aligned and on x's device;
    the centring prunes have no GELU producer (``act`` 0)."""
    if centre is None and centre_rows is None:
        return
    if centre is None or centre_rows is None:
        raise Unsupported("site centring needs both centre and centre_rows")
    if act:
        raise Unsupported("the centring prunes have no GELU producer: centre the GELU's output (act=0)")
    m, k = x.shape
    if m == 0:
        raise Unsupported("a centred site needs at least one token row")
    check_tensor(centre, "site centre", x, torch.float32)
    if (centre.dim() != 2 or centre.shape[1] != k or centre.shape[0] == 0 or m % centre.shape[0]
            or centre.stride(1) != 1 or centre.stride(0) % 4 or not _rows_apart(centre, k)):
        raise Unsupported(f"site centre {_where(centre)} must be float32 [B, K={k}] with B dividing M={m}, unit "
                          "stride along K and a row stride >= K that is a multiple of 4")
    check_tensor(centre_rows, "site centre_rows", x)
    if (centre_rows.dim() != 2 or centre_rows.shape[1] != k or centre_rows.stride(1) != 1
            or centre_rows.stride(0) % 8 or not _rows_apart(centre_rows, k)):
        raise Unsupported(f"site centre_rows {_where(centre_rows)} must be [R, K={k}] with unit stride along K and a "
                          "row stride >= K that is a multiple of 8")
    check_aligned(centre, "site centre")
    check_aligned(centre_rows, "site centre_rows")


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


# ----------------------------------------------------------------------------------------------- FP8 (rtlynx.ops.fp8)
def check_fp8_activation(x, act: int = 0) -> None:
    """Input of the FP8 producer (``rtlynx::prune_quant_fp8_sm90``, the FP8 sites): x [M, K] bf16 (the FP8 GEMM
    writes bf16) with K % 8 == 0 and K <= 16384, any strides (the callers copy it row-major); act 0 (x) or 1
    (GELU_tanh(x))."""
    check_activation(x)
    if x.dtype != torch.bfloat16:
        raise Unsupported(f"the FP8 kernels take bf16 activations (their GEMM writes bf16), got {x.dtype}")
    k = x.shape[1]
    if k % 8 or k > FP8_MAX_K:
        raise Unsupported(f"x {_where(x)}: the FP8 kernels need K % 8 == 0 and K <= {FP8_MAX_K}")
    if act not in (0, 1):
        raise Unsupported(f"FP8 producer act must be 0 (none) or 1 (GELU-tanh), got {act!r}")


def check_fp8_gemm(values, meta, wq, rs, sw, bias) -> None:
    """Operands of ``rtlynx::sparse_gemm_fp8_sm90``: values [M, Kg/2] e4m3 packed (row stride Kg/2), meta,
    wq [N, Kg] e4m3 (Kg % 128 == 0, N % 8 == 0), rs [M] and sw [N] float32, bias [N] bf16 or None."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.dtype != FP8:
        raise Unsupported(f"values must be a 2-D float8_e4m3fn tensor, got "
                          f"{_where(values) if isinstance(values, torch.Tensor) else type(values).__name__}")
    if not isinstance(wq, torch.Tensor) or wq.dim() != 2:
        raise Unsupported("wq must be a 2-D tensor [N, Kg]")
    n, kg = wq.shape
    if kg % 128 or kg == 0:
        raise Unsupported(f"wq {_where(wq)}: Kg must be a positive multiple of 128 (quantize_weight pads it)")
    check_rows(values, "values", values, None, kg // 2)
    if values.shape[0] > 1 and values.stride(0) != kg // 2:
        raise Unsupported(f"values {_where(values)} must be packed (row stride {kg // 2}), got strides "
                          f"{values.stride()}")
    check_weight(wq, "wq", values, kg)
    check_meta(meta, values, kg, min_rows=1)  # M = 0: the producer's one 64-row block (the GEMM returns at once)
    check_vector(rs, "rs", values, values.shape[0], torch.float32)
    check_vector(sw, "sw", values, n, torch.float32)
    if bias is not None:
        check_vector(bias, "bias", values, n, torch.bfloat16)


def check_fp8_site(x, wq, sw, bias, splits, act: int = 0, lora_a=None, lora_b=(), lora_terms=()) -> None:
    """Operands of an FP8 activation site (``rtlynx::fp8_site_sm90``): x as :func:`check_fp8_activation`;
    wq [N, >= Kp] e4m3 row-major (Kp = round_up(K, 128)); splits positive multiples of 8 summing to N; sw [N]
    float32; bias [N] bf16 or None; the LoRA tail: lora_a [R, K] bf16, one B_t [N_i, c1 - c0] bf16 per term
    ``(i, c0, c1)`` of the flat lora_terms, 0 <= c0 < c1 <= R."""
    check_fp8_activation(x, act)
    kp = (x.shape[1] + 127) // 128 * 128
    if not isinstance(wq, torch.Tensor) or wq.dim() != 2 or wq.shape[1] < kp:
        raise Unsupported(f"FP8 site wq {_where(wq) if isinstance(wq, torch.Tensor) else wq!r} does not fit x "
                          f"{_where(x)} (needs [N, >= {kp}])")
    check_weight(wq, "FP8 site wq", x, wq.shape[1], dtype=FP8)
    if sum(splits) != wq.shape[0] or any(n <= 0 or n % 8 for n in splits):
        raise Unsupported(f"FP8 site splits {list(splits)} must be positive multiples of 8 summing to "
                          f"N={wq.shape[0]}")
    check_vector(sw, "FP8 site sw", x, wq.shape[0], torch.float32)
    if bias is not None:
        check_vector(bias, "FP8 site bias", x, wq.shape[0], torch.bfloat16)
    _check_fp8_tail(x, splits, lora_a, lora_b, lora_terms)


def _check_fp8_tail(x, splits, lora_a, lora_b, lora_terms) -> None:
    if lora_a is None:
        if len(lora_b) or len(lora_terms):
            raise Unsupported("FP8 site: LoRA terms without lora_a")
        return
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 2 or lora_a.shape[1] != x.shape[1]:
        raise Unsupported(f"FP8 site lora_a {_where(lora_a) if isinstance(lora_a, torch.Tensor) else lora_a!r} "
                          f"must be [R, K={x.shape[1]}]")
    check_tensor(lora_a, "FP8 site lora_a", x, torch.bfloat16)
    if len(lora_terms) != 3 * len(lora_b):
        raise Unsupported(f"FP8 site: {len(lora_terms)} lora_terms entries for {len(lora_b)} B factors "
                          "(three per term: member, first column, end column)")
    for t, b in enumerate(lora_b):
        i, c0, c1 = lora_terms[3 * t: 3 * t + 3]
        if not (0 <= i < len(splits) and 0 <= c0 < c1 <= lora_a.shape[0]):
            raise Unsupported(f"FP8 site LoRA term {t} (member {i}, columns {c0}:{c1}) is out of range "
                              f"({len(splits)} members, lora_a of {lora_a.shape[0]} rows)")
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != (splits[i], c1 - c0):
            raise Unsupported(f"FP8 site LoRA B of term {t} must be [{splits[i]}, {c1 - c0}], got "
                              f"{tuple(b.shape) if isinstance(b, torch.Tensor) else b!r}")
        check_tensor(b, f"FP8 site LoRA B of term {t}", x, torch.bfloat16)


__all__ = ["FP8", "FP8_MAX_K", "KERNEL_DTYPES", "LibraryUnavailable", "Unsupported", "check_activation",
           "check_aligned", "check_centre", "check_devices", "check_fp8_activation", "check_fp8_gemm", "check_fp8_site", "check_gemm",
           "check_linear", "check_meta", "check_prune", "check_rows", "check_site", "check_tensor", "check_vector",
           "check_weight"]
