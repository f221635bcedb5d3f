"""The refused calls of tests/gpu/test_op_checks_gpu.py under compute-sanitizer (no kernel may touch memory
for them), then good calls on the same operands:

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu/sanitize_checks.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_op_checks_gpu import BAD_GEMM, _operands, test_linear_and_site_refusals_on_device  # noqa: E402

from rtlynx import ops  # noqa: E402
from rtlynx.ops import sm90 as k90  # noqa: E402

torch.manual_seed(0)
refused = 0
for case, (slot, make, _) in sorted(BAD_GEMM.items()):
    _, args = _operands()
    bad = list(args)
    bad[slot] = make(args)
    try:
        k90.sparse_gemm_sm90(*bad)
    except ops.Unsupported:
        refused += 1
    else:
        raise SystemExit(f"sanitize_checks: {case} was not refused")
    k90.sparse_gemm_sm90(*args)
test_linear_and_site_refusals_on_device()
torch.cuda.synchronize()
print(f"sanitize_checks: {refused} GEMM refusals + the linear/site refusals, no launch on bad operands")
