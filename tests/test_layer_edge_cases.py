"""Empty batches, dtype mismatches (as nn.Linear) and large activations (the norm scale must not overflow)."""

import pytest
import torch

import rtlynx
from rtlynx import reference as R


def _layer(k, n, dtype=torch.float32, gen=None, **kw):
    lin = torch.nn.Linear(k, n).to(dtype)
    if gen is not None:
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
    return lin, rtlynx.SparseActLinear.from_linear(lin, **kw)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
@pytest.mark.parametrize("kw", [{}, {"compensation": "none"}, {"lora_rank": 4}])
def test_empty_batch_gives_empty_output(lead, kw):
    lin, layer = _layer(64, 24, **kw)
    x = torch.randn(*lead, 64)
    y = layer(x)
    assert y.shape == lin(x).shape == (*lead, 24) and y.dtype == x.dtype


def test_empty_batch_reference_functions():
    x = torch.randn(0, 64, dtype=torch.bfloat16)
    assert R.prune_nm(x).shape == (0, 64) and R.norm_scale(x).shape == (0,)
    values, meta = R.compress(x)
    assert values.shape == (0, 32) and meta.shape == (0, 8)
    assert R.decompress(values, meta).shape == (0, 64)
    assert R.compress(torch.randn(0, 64), 4, 8)[1].shape == (0, 16)  # 4-bit indices


@pytest.mark.parametrize("layer_dtype,x_dtype", [(torch.float32, torch.float64), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_dtype_mismatch_raises_like_nn_linear(layer_dtype, x_dtype):
    lin, layer = _layer(64, 16, layer_dtype)
    x = torch.randn(3, 64).to(x_dtype)
    with pytest.raises(RuntimeError) as want:
        lin(x)
    with pytest.raises(RuntimeError, match="same dtype") as got:
        layer(x)
    assert "mat1 and mat2 must have the same dtype" in str(want.value) and str(x_dtype).split(".")[1][:4].lower() \
        in str(got.value).lower()


def test_autocast_still_runs_mixed_dtypes(gen):
    lin, layer = _layer(64, 16, gen=gen)
    x = torch.randn(3, 64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_dense = lin(x)
        y = layer(x)
    assert y.shape == y_dense.shape and torch.isfinite(y).all()


def _norm_scale_f64(x, xp, eps=1e-8):
    xd, pd = x.double(), xp.double()
    return torch.sqrt((xd * xd).sum(-1) / ((pd * pd).sum(-1) + eps))


@pytest.mark.parametrize("big", [1e18, 3e19, 1e36, 3e38])
def test_norm_scale_does_not_overflow(big, gen):
    x = torch.randn(4, 3072, generator=gen).bfloat16()
    x[0] = big
    x[1, ::7] = big
    x[2, 5] = -big
    xp = R.prune_nm(x)
    s = R.norm_scale(x, xp)
    want = _norm_scale_f64(x, xp)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s.double(), want, rtol=1e-5, atol=0)


def test_norm_scale_unchanged_where_nothing_overflows(gen):
    """Scaling by a power of two is exact: where the plain float32 formula is finite, the same bits."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(300, 512, generator=gen) * torch.logspace(-4, 4, 300).unsqueeze(1)).to(dtype)
        x[0] = 0
        x[1, 3] = float("nan")
        x[2, 9] = float("inf")
        xp = R.prune_nm(x)
        xf, pf = x.float(), xp.float()
        plain = torch.sqrt((xf * xf).sum(-1) / ((pf * pf).sum(-1) + 1e-8))
        assert torch.equal(R.norm_scale(x, xp).view(torch.int32)[3:], plain.view(torch.int32)[3:])
        assert R.norm_scale(x, xp)[0] == 0 and R.norm_scale(x, xp)[1:3].isnan().all()


def test_large_bf16_activations_stay_finite(gen):
    lin, layer = _layer(3072, 32, torch.bfloat16, gen=gen)
    x = torch.randn(6, 3072, generator=gen).bfloat16()
    x[:3] *= 1e18
    with torch.no_grad():
        dense = lin(x)
        y = layer(x)
        want = R.sparse_act_linear(x.double(), lin.weight.double(), lin.bias.double())  # float64: no overflow
    assert torch.isfinite(dense).all() and torch.isfinite(y).all()
    assert float((y.double() - want).norm() / want.norm()) < 1e-2
