"""Per-layer kernels of SparseActLinear on a 2-D input ``x [M, K]``: one :class:`Backend` object each.

Each backend computes exactly ``reference.sparse_act_linear`` (the spec) and raises
:class:`BackendUnavailable` when it cannot run the given call; the layer then falls back along
``Backend.fallback`` with a one-time warning.

- reference: pure torch on any device (mask + dense GEMM on the pruned x). Correct, not fast.
- cusparselt: PyTorch's ``torch._cslt_compress`` / ``torch._cslt_sparse_mm`` (2:4, fp16/bf16, CUDA):
  what a user can assemble today. Its fused bias is added per row when the sparse operand is on the
  left, so bias, norm scale and LoRA are applied outside the call.
- lynx: rtlynx's fused Hopper kernels (``rtlynx.ops``).

These are the bf16/fp16 backends (:data:`BACKENDS`). A kernel family (:mod:`rtlynx.families`) names the backends its
dtype has: FP8 has one, its own spec on the reference path (its kernels run whole activation sites, through
``rtlynx.ops.fp8_site``), and :func:`run` treats the others as unavailable for it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import ops, reference

_warned: set[str] = set()


class BackendUnavailable(RuntimeError):
    """This backend cannot run this call (device, dtype, pattern, shape or missing library)."""


def warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` is seen in this process (fallbacks are per-call decisions)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def cusparselt_status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        ok = torch.backends.cusparselt.is_available()
    except Exception as e:  # very old torch
        return False, f"torch.backends.cusparselt unavailable ({e})"
    return (True, f"cuSPARSELt {torch.backends.cusparselt.version()}") if ok else (False, "torch built without cuSPARSELt")


def lynx_status(device_index: int | None = None) -> tuple[bool, str]:
    return ops.lynx_status(device_index)


# Availability as compile-time constants: torch.compile evaluates these once while tracing instead of
# tracing into them (they stat files and query the driver, which would break the graph at every layer).
@torch.compiler.assume_constant_result
def _lynx_ok(device_index: int) -> bool:
    return device_index >= 0 and lynx_status(device_index)[0]


@torch.compiler.assume_constant_result
def _cusparselt_ok(device_index: int) -> bool:
    return device_index >= 0 and cusparselt_status()[0]


def _device_index(x: torch.Tensor) -> int:
    return (x.device.index or 0) if x.is_cuda else -1


class Backend:
    """A per-layer kernel: ``run(x, weight, bias, n, m, compensation, lora_a, lora_b, eps) -> y`` computes the spec
    or raises :class:`BackendUnavailable`; ``fallback`` names the backend to try next (None: the last)."""

    name = ""
    fallback: str | None = None

    def run(self, x, weight, bias, n, m, compensation, lora_a, lora_b, eps):
        raise NotImplementedError


class Reference(Backend):
    name, fallback = "reference", None

    def run(self, x, weight, bias, n, m, compensation, lora_a, lora_b, eps):
        return reference.sparse_act_linear(x, weight, bias, n, m, compensation, lora_a, lora_b, eps)


class CuSparseLt(Backend):
    name, fallback = "cusparselt", "reference"

    def run(self, x, weight, bias, n, m, compensation, lora_a, lora_b, eps):
        if not _cusparselt_ok(_device_index(x)):
            raise BackendUnavailable(cusparselt_status()[1] if x.is_cuda else "x is not on a CUDA device")
        if (n, m) != (2, 4):
            raise BackendUnavailable(f"cuSPARSELt runs 2:4 only, not {n}:{m}")
        if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
            raise BackendUnavailable(f"cuSPARSELt needs CUDA fp16/bf16 x and weight, got {x.dtype}/{weight.dtype} "
                                     f"on {x.device}")
        # cuSPARSELt wants every dim a multiple of 16 (bf16/fp16); pad rows, refuse odd K/N.
        mrows, k = x.shape
        if k % 16 or weight.shape[0] % 16:
            raise BackendUnavailable(f"cuSPARSELt needs K and N multiples of 16, got K={k}, N={weight.shape[0]}")
        if mrows == 0:  # an empty batch: nothing to compress (cuSPARSELt refuses 0 rows)
            return x.new_empty(0, weight.shape[0])
        xp = reference.prune_nm(x, n, m)
        pad = (-mrows) % 16
        xs = F.pad(xp, (0, 0, 0, pad)) if pad else xp
        try:
            y = torch._cslt_sparse_mm(torch._cslt_compress(xs.contiguous()), weight.t())[:mrows]
        except RuntimeError as e:
            raise BackendUnavailable(f"cuSPARSELt failed: {e}") from e
        if compensation == "norm":
            y = y * reference.norm_scale(x, xp, eps=eps).to(y.dtype).unsqueeze(-1)
        if bias is not None:
            y = y + bias
        if lora_a is not None and lora_b is not None:
            y = y + F.linear(F.linear(x, lora_a), lora_b)
        return y


class Lynx(Backend):
    name, fallback = "lynx", "cusparselt"

    def run(self, x, weight, bias, n, m, compensation, lora_a, lora_b, eps):
        idx = _device_index(x)
        if not _lynx_ok(idx):
            raise BackendUnavailable(lynx_status(idx)[1] if idx >= 0 else "x is not on a CUDA device")
        try:
            return ops.lynx_linear(x, weight, bias, compensation == "norm", lora_a, lora_b, n=n, m=m, eps=eps)
        except ops.Unsupported as e:
            raise BackendUnavailable(str(e)) from e


BACKENDS: dict[str, Backend] = {b.name: b for b in (Lynx(), CuSparseLt(), Reference())}
run_reference, run_cusparselt, run_lynx = (BACKENDS[k].run for k in ("reference", "cusparselt", "lynx"))
# Where each backend goes when it cannot run a call; "auto" starts at the fastest.
FALLBACK = {"auto": "lynx", **{b.name: b.fallback for b in BACKENDS.values()}}


def run(backend: str, *args, backends: dict[str, Backend] = BACKENDS):
    """Run ``backend`` on the call, falling back (with a one-time warning) until one can run it. ``backends``: the
    ones the layer's kernel family has (a name it lacks counts as unable to run the call).

    The "auto" chain falls back silently from lynx/cuSPARSELt to the reference on CPU, where that
    is the expected path; an explicitly requested backend that cannot run always warns.
    """
    requested = backend
    name = FALLBACK[backend] if backend == "auto" else backend
    reasons = []
    x = args[0]
    if requested == "auto" and not x.is_cuda:
        name = "reference"  # the expected path on a CPU: no probing, nothing to warn about
    while name is not None:
        try:
            if name not in backends:
                raise BackendUnavailable(f"this dtype has no {name} kernel for a layer")
            return backends[name].run(*args)
        except BackendUnavailable as e:
            reasons.append(f"{name}: {e}")
            nxt = FALLBACK[name]
            if requested != "auto" or x.is_cuda:
                warn_once(f"{requested}->{name}:{e}",
                          f"rtlynx backend {name!r} cannot run this call ({e}); falling back to {nxt!r}")
            name = nxt
    raise RuntimeError("no rtlynx backend could run this call: " + "; ".join(reasons))
