"""A kernel library that cannot be loaded does not break a forward on the GPU (CPU version with mocks:
tests/test_build.py): one warning naming the cause, auto runs on cuSPARSELt / the reference, no retry."""

import os
import subprocess
import sys

SCRIPT = r'''
import warnings
import torch
import rtlynx
from rtlynx import reference as R
from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer

torch.manual_seed(0)
lin = torch.nn.Linear(256, 256).cuda().to(torch.bfloat16)
layer = rtlynx.SparseActLinear.from_linear(lin, speed_rules=False)
x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with torch.no_grad():
        y = layer(x)
        y2 = layer(x)
        model = tiny_transformer("flux").cuda().to(torch.bfloat16)
        rtlynx.sparsify(model, speed_rules=False)
        out = output_tensor(model(**example_inputs(model, batch=2)))
msgs = [str(c.message) for c in caught if "RTLYNX_LIB" in str(c.message)]
assert len(msgs) == 1, msgs
want = R.sparse_act_linear(x, lin.weight, lin.bias, compute_dtype=torch.float32)
rel = float((y.float() - want).norm() / want.norm())
assert rel < 1e-2 and torch.equal(y, y2) and torch.isfinite(out).all(), rel
ok, why = rtlynx.backends.lynx_status()
assert not ok and "RTLYNX_LIB" in why
print("fallback ok", rel)
'''


def test_bad_library_falls_back(tmp_path):
    bad = tmp_path / "librtlynx_sm90.so"
    bad.write_bytes(b"not a shared library")
    env = {**os.environ, "RTLYNX_LIB": str(bad)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "fallback ok" in r.stdout, r.stdout + r.stderr
