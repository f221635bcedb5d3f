"""Empty batches on every GPU path, and the norm scale of very large bf16 activations (CPU side:
tests/test_layer_edge_cases.py)."""

import pytest
import torch

import rtlynx
from rtlynx import backends, ops
from rtlynx import reference as R

BF = torch.bfloat16


@pytest.mark.parametrize("backend", ["cusparselt", "lynx", "auto"])
def test_empty_batch(backend):
    lin = torch.nn.Linear(256, 128).cuda().to(BF)
    layer = rtlynx.SparseActLinear.from_linear(lin, backend=backend, speed_rules=False)
    for lead in [(0,), (2, 0)]:
        x = torch.randn(*lead, 256, device="cuda", dtype=BF)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (*lead, 128) and y.dtype == BF
    y = backends.run_cusparselt(torch.empty(0, 256, device="cuda", dtype=BF), lin.weight, lin.bias, 2, 4, "norm",
                                None, None, 1e-8)
    assert y.shape == (0, 128)


def test_empty_batch_ops():
    h = torch.empty(0, 256, device="cuda", dtype=BF)
    w = torch.randn(128, 256, device="cuda", dtype=BF)
    assert ops.lynx_gelu_linear(h, w, None).shape == (0, 128)
    assert ops.lynx_linear(h, w, None, True, None, None).shape == (0, 128)
    assert [t.shape for t in ops.lynx_site_linear(h, w, None, None, (64, 64))] == [(0, 64), (0, 64)]


@pytest.mark.xfail(strict=True, reason="csrc/prune_compress_sm90.cu sums unscaled squares in float32 (overflow "
                                       "above ~1.8e19): the kernel must scale each row by a power of two near its "
                                       "max |x| first, as rtlynx.reference.norm_scale does")
def test_kernel_norm_scale_of_large_activations():
    x = torch.randn(64, 3072, device="cuda").to(BF)
    x[:8] *= 1e18
    _, _, scale = ops.prune_compress(x)
    assert torch.isfinite(scale).all()
    torch.testing.assert_close(scale, R.norm_scale(x), rtol=1e-5, atol=0)
