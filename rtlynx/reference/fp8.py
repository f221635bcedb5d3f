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
"""

from __future__ import annotations

import torch

from .nm import norm_scale, prune_nm

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def quantize_rows_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) absmax quantisation: ``(q float8_e4m3fn like x, scale float32 [...])`` with
    ``q * scale ~= x`` (q = 0 and scale = 0 for an all-zero row)."""
    if not x.is_floating_point():
        raise TypeError(f"FP8 quantisation needs a floating-point tensor, got {x.dtype}")
    xf = x.float()
    absmax = xf.abs().amax(-1)
    scale = absmax / E4M3_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (xf / safe.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)  # clamp keeps NaN
    return q, scale


def prune_quantize_e4m3(x: torch.Tensor, n: int = 2, m: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4-prune x, then :func:`quantize_rows_e4m3` of the kept values: ``(q [.., K] dense-with-zeros, sx)``."""
    return quantize_rows_e4m3(prune_nm(x, n, m))


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` (scale broadcast over the last dim)."""
    return q.float() * scale.unsqueeze(-1)


def fp8_sparse_act_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, n: int = 2,
                          m: int = 4, compensation: str = "norm", lora_a: torch.Tensor | None = None,
                          lora_b: torch.Tensor | None = None, eps: float = 1e-8,
                          weight_q: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The FP8 RT-Lynx linear on ``x [..., K]`` (module docstring). ``weight_q``: the weight already quantised
    ``(q [N, K], sw [N])`` (quantised here when None). Returns x's dtype."""
    if compensation not in ("norm", "none"):
        raise ValueError(f"compensation must be 'norm' or 'none', got {compensation!r}")
    xp = prune_nm(x, n, m)
    qx, sx = quantize_rows_e4m3(xp)
    qw, sw = weight_q if weight_q is not None else quantize_rows_e4m3(weight)
    acc = qx.float() @ qw.float().T  # exact products, float32 sums
    scale = sx.unsqueeze(-1) * sw.float()
    if compensation == "norm":
        scale = scale * norm_scale(x, xp, eps=eps).unsqueeze(-1)
    y = acc * scale
    if bias is not None:
        y = y + bias.float()
    if lora_a is not None and lora_b is not None:  # h rounded to x's dtype (a GEMM output), h B^T summed in float32
        h = torch.nn.functional.linear(x, lora_a.to(x.dtype))
        y = y + h.float() @ lora_b.float().T
    return y.to(x.dtype)
