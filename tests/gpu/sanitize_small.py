"""Small run of every lynx kernel for compute-sanitizer:
compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu/sanitize_small.py
The newest kernels (the centring prunes, the FP8 site op's LoRA tail) run through their GPU tests' bodies at the
small awkward shapes, so their checks against the twins run under the sanitizer too."""

import sys
from pathlib import Path

import torch

from rtlynx import ops
from rtlynx.ops import sm90 as k90

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
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.gpu as a package
from tests.gpu import test_centre_gpu as tc, test_fp8_kernels as tf  # noqa: E402

seed = torch.seed() % 2**31
print(f"seed {seed}")
g = torch.Generator(device="cuda")
g.manual_seed(seed)
for b, t, k in [(1, 1, 64), (2, 7, 200), (3, 33, 392)]:
    tc.test_centred_prune_is_the_twin_bit_for_bit(b, t, k, g)
    tc.test_centred_fp8_prune_is_the_twin_bit_for_bit(b, t, k, g)
tf.test_fp8_site_tail_matches_the_formula(g)
torch.cuda.synchronize()
print("sanitize_small: done")
