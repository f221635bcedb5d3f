"""Small run of every lynx kernel for compute-sanitizer:
compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu/sanitize_small.py"""

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
torch.cuda.synchronize()
print("sanitize_small: done")
