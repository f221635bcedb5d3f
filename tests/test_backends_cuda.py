"""Backends on a CUDA device (skipped elsewhere): reference on GPU == reference on CPU, cuSPARSELt
within bf16 tolerance of an fp32 product of the same pruned operands, bias added per output column."""

import pytest
import torch

import rtlynx
from rtlynx import backends
from rtlynx import reference as R

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_reference_on_gpu_matches_cpu_bitwise(dtype, n, m):
    x = torch.randn(333, 1024, dtype=dtype)
    x[3, 7] = float("nan")
    xg = x.cuda()
    assert torch.equal(R.nm_mask(xg, n, m).cpu(), R.nm_mask(x, n, m))
    v, meta = R.compress(xg, n, m)
    vc, metac = R.compress(x, n, m)
    assert torch.equal(meta.cpu(), metac)
    # NaN payload bits are not part of the spec (CPU and CUDA copies may differ); NaN-ness is.
    assert torch.equal(v.cpu().isnan(), vc.isnan())
    bad = ((v.cpu().view(torch.int16) != vc.view(torch.int16)) & ~vc.isnan()).nonzero()
    assert len(bad) == 0, f"{len(bad)} values differ, first at {bad[:3].tolist()}: gpu {v.cpu()[tuple(bad[0])]} cpu {vc[tuple(bad[0])]}"


@pytest.mark.parametrize("mrows", [1, 7, 333, 1024])
@pytest.mark.parametrize("k,nout", [(64, 48), (3072, 3072), (1024, 4096)])
@pytest.mark.parametrize("lora", [False, True])
def test_cusparselt_backend_matches_fp32_spec(mrows, k, nout, lora):
    ok, why = backends.cusparselt_status()
    if not ok:
        pytest.skip(why)
    dt = torch.bfloat16
    x = torch.randn(mrows, k, device="cuda", dtype=dt)
    w = (torch.randn(nout, k, device="cuda") / k ** 0.5).to(dt)
    b = torch.randn(nout, device="cuda", dtype=dt)
    a, bb = ((torch.randn(16, k, device="cuda", dtype=dt) / k ** 0.5, torch.randn(nout, 16, device="cuda", dtype=dt))
             if lora else (None, None))
    want = R.sparse_act_linear(x, w, b, 2, 4, "norm", a, bb, compute_dtype=torch.float32).float()
    got = backends.run_cusparselt(x, w, b, 2, 4, "norm", a, bb, 1e-8)
    assert got.shape == (mrows, nout) and got.dtype == dt
    assert _rel(got, want) < 1e-2


def test_auto_backend_on_tiny_flux_cuda():
    from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer

    model = tiny_transformer("flux").cuda().to(torch.bfloat16)
    inputs = example_inputs(model, batch=2)
    with torch.no_grad():
        ref = output_tensor(model(**inputs)).clone()
        rtlynx.sparsify(model, speed_rules=False)  # tiny shapes: the speed rules would keep them dense
        out = output_tensor(model(**inputs))
        rtlynx.configure(model, backend="reference")
        spec = output_tensor(model(**inputs))
        with rtlynx.dense_mode(model):
            assert torch.equal(output_tensor(model(**inputs)), ref)
    assert torch.isfinite(out).all()
    assert _rel(out, spec) < 3e-2
