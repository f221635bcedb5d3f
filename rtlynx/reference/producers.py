"""Producers fused into the prune pass: the element-wise ops that compute a layer's input, which a kernel can
apply on the fly while it prunes (read the producer's input once instead of writing and re-reading x).

- :func:`gelu_tanh`: the MLP down-projection's input in FLUX / Qwen-Image (``FeedForward``: fc1 -> GELU(tanh)
  -> fc2), the spec of ``rtlynx::gelu_prune_compress_sm90``.

Rounding of :func:`gelu_tanh` (what the kernel computes, and the bits the GPU tests compare): the input is
widened to float32, GELU-tanh is evaluated in float32 with torch's expression and the result is rounded once
(round to nearest even) to the input dtype, i.e. ``F.gelu(h.float(), approximate="tanh").to(h.dtype)``, which is
also what ``F.gelu(h, approximate="tanh")`` gives for a bf16 / fp16 ``h`` on CUDA (opmath float). On CUDA the kernel
and this function agree bit for bit: both evaluate ``0.5 x (1 + tanhf(kBeta fma(0.044715, x^3, x)))`` with the same
float32 operations and CUDA's ``tanhf``. On the CPU torch evaluates the same formula with its own vectorised tanh,
which can differ in the last float32 bit, so a CPU result can differ from the kernel's by one unit of the 16-bit
dtype in rare elements (the CPU tests check agreement within that unit).
"""

from __future__ import annotations

import torch


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, evaluated in float32 and rounded once to ``h``'s dtype."""
    if not h.is_floating_point():
        raise TypeError(f"gelu_tanh needs a floating-point tensor, got {h.dtype}")
    return torch.nn.functional.gelu(h.float(), approximate="tanh").to(h.dtype)


PRODUCERS = {"gelu_tanh": gelu_tanh}
