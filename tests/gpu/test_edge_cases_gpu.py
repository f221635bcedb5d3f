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


@pytest.mark.parametrize("m,k", [(64, 3072), (5, 15360), (300, 136)])  # 8 to 128 threads per row
def test_kernel_norm_scale_of_large_activations(m, k):
    """Rows whose squares overflow float32 are summed again divided by a power of two (rtlynx.reference.norm_scale)."""
    x = torch.randn(m, k, device="cuda").to(BF)
    x[:4] *= 1e18
    x[1] *= 1e18  # near the bf16 maximum
    x[2, 5] = float("inf")  # an inf in an overflowing row: s stays NaN, as the reference
    _, _, scale = ops.prune_compress(x)
    assert torch.isfinite(scale[[0, 1, 3]]).all() and scale[2].isnan()
    torch.testing.assert_close(scale, R.norm_scale(x), rtol=1e-5, atol=0, equal_nan=True)
