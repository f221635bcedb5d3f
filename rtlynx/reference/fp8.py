"""FP8 (e4m3) RT-Lynx linear: the specification of the FP8 + 2:4 path (issue "FP8 + 2:4").

    y = s * sx[m] * sw[n] * (Q(prune(x) / sx) @ Q(W / sw)^T) + b + (x A^T) B^T

- Activations: pruned 2:4 first (as :func:`rtlynx.reference.nm.prune_nm`), then one scale per token from the
  absolute maximum of the **kept** values, ``sx = absmax / 448`` (448 = the largest float8_e4m3fn), then every kept
  value divided by sx, clamped to +-448 and cast to float8_e4m3fn (round to nearest even, as torch's cast).
- Weights: one scale per output channel, ``sw = absmax(W[n]) / 448``, quantised the same way, once.
- The norm scale s is the bf16 path's (:func:`rtlynx.reference.nm.norm_scale` of x and prune(x)): it compensates
  the pruning, not the quantisation.
- Products of two e4m3 values are exact in float32 and the sums are float32 (the tensor cores' accumulator); the
  epilogue multiplies s * sx * sw in float32 and adds the bias, then rounds once to x's dtype.
- The LoRA branch (if any) runs on the dense x: ``h = x A^T`` rounded to x's dtype, ``h B^T`` summed in float32 with
  the rest before the one rounding (as a fused epilogue or LoRA tail would).
- A zero row has scale 0 and quantises to zeros (no NaN); a NaN in x makes its token's scale and output NaN.
- ``centre`` c (token-mean centring, as :func:`rtlynx.reference.nm.sparse_act_linear`): the pruned, quantised and
  norm-scaled operand is ``x - c`` (rounded once to x's dtype), and the centre's output comes from the same FP8 GEMM
  as four more rows a sample (:func:`fp8_centre_rows`: c split into two 2:4-exact rows, then the residual of their
  e4m3 quantisation split the same way), each row quantised, norm-scaled and given its LoRA term like a token, the
  four outputs summed, less the residual pair's LoRA term (the site takes it back out with two small products). So
  ``c W^T`` is computed on the FP8 weights to ~2^-8 of c (one pair of rows alone: ~2^-4), the site needs no bf16
  weights, and the LoRA terms add up to LoRA(x - c) + LoRA(c) = LoRA(x).
"""

from __future__ import annotations

import torch

from .nm import centre_rows, centred, compress, decompress, norm_scale, prune_nm
from .producers import gelu_tanh
from .sm90 import ATOM_K, ATOM_M, padded_shape, round_up

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def quantize_rows_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) absmax quantisation: ``(q float8_e4m3fn like x, scale float32 [...])`` with
    ``q * scale ~= x`` (q = 0 and scale = 0 for an all-zero row)."""
    if not x.is_floating_point():
        raise TypeError(f"FP8 quantisation needs a floating-point tensor, got {x.dtype}")
    xf = x.float()
    absmax = xf.abs().amax(-1)
    # a tensor divisor: CUDA turns a Python-scalar one into absmax * (1/448), which is not the IEEE quotient the
    # kernels (and the CPU) compute, so the reference would depend on its device by one ulp of the scale
    scale = absmax / torch.full_like(absmax, E4M3_MAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (xf / safe.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)  # clamp keeps NaN
    return q, scale


def prune_quantize_e4m3(x: torch.Tensor, n: int = 2, m: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4-prune x, then :func:`quantize_rows_e4m3` of the kept values: ``(q [.., K] dense-with-zeros, sx)``."""
    return quantize_rows_e4m3(prune_nm(x, n, m))


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` (scale broadcast over the last dim)."""
    return q.float() * scale.unsqueeze(-1)


def fp8_centre_rows(c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The centres ``c`` ([..., K], one per sample, float32) as four 2:4-exact rows a sample for an FP8 site GEMM,
    ``[c_a; c_b; r_a; r_b]`` ``[4B, K]`` in ``dtype``: ``[c_a; c_b]`` = :func:`rtlynx.reference.nm.centre_rows`, then
    ``r = c - (e4m3 dequantisation of c_a and c_b)``, split the same way. A 2:4 prune keeps every row whole and
    quantises it per row (:func:`quantize_rows_e4m3`: the same scale the kernel picks), so the four rows' FP8 products
    sum to ``c W_q^T`` up to r's own quantisation."""
    k = c.shape[-1]
    cf = c.float().reshape(-1, k)
    hi = centre_rows(cf, dtype)
    q, s = quantize_rows_e4m3(hi)
    deq = dequantize(q, s)
    b = cf.shape[0]
    r = cf - (deq[:b] + deq[b:])
    return torch.cat([hi, centre_rows(r, dtype)])


def _fp8_rows(xs: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, n: int, m: int, compensation: str,
              eps: float) -> torch.Tensor:
    """``s * sx * sw * (Q(prune(xs) / sx) @ Qw^T)`` in float32 (no bias, no LoRA): the FP8 GEMM of rows ``xs``."""
    xp = prune_nm(xs, n, m)
    qx, sx = quantize_rows_e4m3(xp)
    acc = qx.float() @ qw.float().T  # exact products, float32 sums
    scale = sx.unsqueeze(-1) * sw.float()
    if compensation == "norm":
        scale = scale * norm_scale(xs, xp, eps=eps).unsqueeze(-1)
    return acc * scale


def fp8_sparse_act_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, n: int = 2,
                          m: int = 4, compensation: str = "norm", lora_a: torch.Tensor | None = None,
                          lora_b: torch.Tensor | None = None, eps: float = 1e-8,
                          weight_q: tuple[torch.Tensor, torch.Tensor] | None = None,
                          centre: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 RT-Lynx linear on ``x [..., K]`` (module docstring). ``weight_q``: the weight already quantised
    ``(q [N, K], sw [N])`` (quantised here when None). ``centre`` (float32, broadcast against x; one centre per
    sample or per row): prune ``x - centre``, and the centre's output from :func:`fp8_centre_rows` through the
    same FP8 product. Returns x's dtype."""
    if compensation not in ("norm", "none"):
        raise ValueError(f"compensation must be 'norm' or 'none', got {compensation!r}")
    xs = x if centre is None else centred(x, centre)
    qw, sw = weight_q if weight_q is not None else quantize_rows_e4m3(weight)
    y = _fp8_rows(xs, qw, sw, n, m, compensation, eps)
    lora = lora_a is not None and lora_b is not None

    def tail(rows):  # h rounded to x's dtype (a GEMM output), h B^T summed in float32
        return torch.nn.functional.linear(rows, lora_a.to(x.dtype)).float() @ lora_b.float().T

    if centre is None:
        if lora:
            y = y + tail(x)
    else:
        lead = centre.shape[:-1]  # broadcast over the tokens of each centre
        rows = fp8_centre_rows(centre, x.dtype)
        back = _fp8_rows(rows, qw, sw, n, m, compensation, eps)
        if lora:  # the tail of x - c and of c's first pair (the residual pair's is taken back out)
            y = y + tail(xs)
            back = back + torch.cat([tail(rows[: rows.shape[0] // 2]), torch.zeros_like(back[rows.shape[0] // 2:])])
        y = y + back.reshape(4, -1, back.shape[-1]).sum(0).reshape(*lead, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------- sm90 layout (8-bit A)
# What rtlynx::prune_quant_fp8_sm90 emits and CUTLASS's FP8 sparse GEMM reads (Sm90GemmSparseConfig for 8-bit A:
# the metadata atom is a row-major 64 x 128 block of logical elements, atoms M-first, then K): for the zero-padded
# [Mp, Kp] activation, metadata byte (m, j) of the rows layout (j = k / 8, low nibble = the lower group of 4) sits at
# ``16 m + j % 16 + 16 Mp (j // 16)``: one row-major [Mp, 16]-byte block per 128 columns, blocks one after another.
# Values are the rows layout's kept elements quantised to e4m3: ``[M, Kp/2]`` bytes.


def rows_meta_to_sm90_8bit(meta_rows: torch.Tensor) -> torch.Tensor:
    """Rows-layout 2:4 metadata ``[Mp, Kp/8]`` uint8 -> the 8-bit sm90 layout ``[Mp*Kp/8]``."""
    mp, nbytes = meta_rows.shape
    if meta_rows.dtype != torch.uint8 or mp % ATOM_M or (nbytes * 8) % ATOM_K:
        raise ValueError(f"need uint8 [Mp, Kp/8] with Mp % 64 == 0 and Kp % 128 == 0, got {tuple(meta_rows.shape)}")
    return meta_rows.reshape(mp, nbytes // 16, 16).transpose(0, 1).contiguous().reshape(-1)


def sm90_8bit_meta_to_rows(meta: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """Inverse of :func:`rows_meta_to_sm90_8bit` for an [m, k] activation: ``[Mp, Kp/8]`` bytes."""
    mp, kp = padded_shape(m, k)
    if meta.dtype != torch.uint8 or meta.numel() != mp * kp // 8:
        raise ValueError(f"8-bit sm90 metadata for [{m}, {k}] must be uint8 with {mp * kp // 8} bytes, "
                         f"got {meta.numel()}")
    return meta.reshape(kp // 128, mp, 16).transpose(0, 1).reshape(mp, kp // 8)


def compress_sm90_fp8(x: torch.Tensor, eps: float = 1e-8, norm: bool = True, act: str | None = None):
    """Reference of ``rtlynx::prune_quant_fp8_sm90``: for ``x [M, K]`` (16-bit float; ``act="gelu_tanh"``: x is the
    pre-activation and the pruned input is ``gelu_tanh(x)``), returns ``(values [M, Kp/2] float8_e4m3fn,
    meta [Mp*Kp/8] uint8, rs [M], sx [M], s [M])`` (float32): 2:4 prune, per-token ``sx = absmax(kept) / 448``,
    ``values = e4m3(kept / sx)`` (:func:`quantize_rows_e4m3`), ``s`` the norm scale (1 without ``norm``) and
    ``rs = s * sx`` the GEMM's row scale."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [M, K] activation, got {tuple(x.shape)}")
    if x.element_size() != 2 or not x.is_floating_point():
        raise TypeError(f"the FP8 producer reads 16-bit floats, got {x.dtype}")
    if act not in (None, "gelu_tanh"):
        raise ValueError(f"act must be None or 'gelu_tanh', got {act!r}")
    if act == "gelu_tanh":
        x = gelu_tanh(x)
    rows, k = x.shape
    mp, kp = padded_shape(rows, k)
    xp = torch.nn.functional.pad(x, (0, kp - k, 0, mp - rows))
    kept, meta_rows = compress(xp, 2, 4)
    q, sx = quantize_rows_e4m3(kept[:rows])
    s = norm_scale(x, eps=eps) if norm else torch.ones(rows, dtype=torch.float32, device=x.device)
    return q, rows_meta_to_sm90_8bit(meta_rows), s * sx, sx, s


def decompress_sm90_fp8(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """Dense float32 ``[M, k]`` of the e4m3 kept values (unscaled) from sm90 ``values [M, >= Kp/2]`` and ``meta``."""
    rows = values.shape[0]
    _, kp = padded_shape(rows, k)
    meta_rows = sm90_8bit_meta_to_rows(meta, rows, k)[:rows]
    return decompress(values[:, : kp // 2].float().contiguous(), meta_rows.contiguous(), 2, 4)[:, :k]


def quantize_weight_e4m3(weight: torch.Tensor, k_padded: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3 weight for the FP8 sparse GEMM: ``(q [N, Kp] float8_e4m3fn, sw [N] float32)``, the
    columns K..Kp-1 zero (``Kp = k_padded`` or round_up(K, 128))."""
    n, k = weight.shape
    kp = k_padded if k_padded is not None else round_up(k, 128)
    if kp < k:
        raise ValueError(f"k_padded={kp} < K={k}")
    q, sw = quantize_rows_e4m3(weight)
    return torch.nn.functional.pad(q.view(torch.uint8), (0, kp - k)).view(FP8), sw


def sparse_gemm_fp8(values: torch.Tensor, meta: torch.Tensor, weight_q: torch.Tensor, rs: torch.Tensor,
                    sw: torch.Tensor, bias: torch.Tensor | None = None, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Reference of ``rtlynx::sparse_gemm_fp8_sm90``: ``rs[m] * sw[n] * (A~ @ Wq^T) + bias`` in float32 (exact
    e4m3 products, float32 sums), rounded once to ``out_dtype``. ``weight_q [N, Kg]`` e4m3."""
    kg = weight_q.shape[1]
    a = decompress_sm90_fp8(values, meta, kg)
    y = (a @ weight_q.float().T) * sw.float() * rs.float().unsqueeze(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
