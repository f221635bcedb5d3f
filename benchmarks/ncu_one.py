"""One prune + one sparse GEMM launch of a shape, for Nsight Compute:
ncu --section SpeedOfLight -k regex:'prune|device_kernel' --launch-skip 2 --launch-count 2 \
    python3 benchmarks/ncu_one.py 4608 3072 12288"""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from rtlynx import ops  # noqa: E402
from rtlynx.ops import sm90 as k90  # noqa: E402

m, k, n = (int(v) for v in sys.argv[1:4]) if len(sys.argv) >= 4 else (4608, 3072, 12288)
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
for _ in range(2):  # launches 1-2 (warm-up) are skipped by --launch-skip 2
    v, mt, s = ops.prune_compress(x)
    y = k90.sparse_gemm_sm90(v, mt, w, s, b)
torch.cuda.synchronize()
print("config", k90.CONFIG_NAMES[k90.choose_config(m, n, k)[0]])
