"""Small run of every lynx kernel for compute-sanitizer:
compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu/sanitize_small.py
The newest kernels (the centring prunes, the FP8 site op's LoRA tail) run through their GPU tests' bodies at the
small awkward shapes, so their checks against the twins run under the sanitizer too."""

import sys
from pathlib import Path

import torch

from rtlynx import ops
from rtlynx.ops import sm90 as k90

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.gpu as a package
from tests.gpu import test_centre_gpu as tc, test_fp8_kernels as tf  # noqa: E402


def kernels_small():
    """Every lynx kernel once at small awkward shapes."""
    torch.manual_seed(0)
    for m, n, k in [(1, 64, 64), (70, 128, 200), (130, 256, 384)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
        bb = torch.randn(n, 64, device="cuda", dtype=torch.bfloat16)
        ops.lynx_linear(x, w, b, True, a, bb)
        ops.lynx_linear(x, w, None, False, None, None)
        for c in range(len(k90.CONFIG_NAMES)):
            v, mt, s = ops.prune_compress(x)
            k90.sparse_gemm_sm90(v, mt, k90.prepare_weight(w), s, b, c)
        k90.gelu_prune_compress_sm90(x, True, 1e-8, True)  # producer-fused prune, dense GELU output too
        ops.lynx_gelu_linear(x, w, b, True)


def calls(g):
    """The GPU tests' bodies this run drives (small awkward shapes, each twin check included), as (test, kwargs):
    tests/test_sanitize_plan.py binds them to the tests' signatures on the CPU, so a changed signature fails there."""
    out = []
    for b, t, k in [(1, 1, 64), (2, 7, 200), (3, 33, 392)]:
        for dtype, r, big in [(torch.bfloat16, 0, False), (torch.bfloat16, 64, False), (torch.float16, 64, False),
                              (torch.bfloat16, 0, True)]:
            out.append((tc.test_centred_prune_is_the_twin_bit_for_bit,
                        dict(b=b, t=t, k=k, dtype=dtype, r=r, big=big, gen=g)))
        for big in (False, True):
            out.append((tc.test_centred_fp8_prune_is_the_twin_bit_for_bit, dict(b=b, t=t, k=k, big=big, gen=g)))
    out.append((tf.test_fp8_site_tail_matches_the_formula, dict(gen=g)))
    return out


if __name__ == "__main__":
    seed = torch.seed() % 2**31
    print(f"seed {seed}")
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    kernels_small()
    for fn, kw in calls(g):
        fn(**kw)
    torch.cuda.synchronize()
    print("sanitize_small: done")
