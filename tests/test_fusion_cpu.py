"""CPU checks of the producer-fusion reference twins (rtlynx.reference.producers, sm90.gelu_compress_sm90) and of
the fused op's fake (meta) implementation. The kernel itself is checked bit for bit in tests/gpu/test_sm90_fusion.py."""

import math

import pytest
import torch

from rtlynx.reference import PRODUCERS, gelu_tanh, norm_scale, prune_nm
from rtlynx.reference import sm90

DTYPES = [torch.bfloat16, torch.float16]


def _h(m, k, dtype, gen, scale=2.0):
    return (torch.randn(m, k, generator=gen) * scale).to(dtype)


def _gelu64(h):
    """Independent GELU-tanh in float64 (python math on every element)."""
    c = math.sqrt(2.0 / math.pi)
    vals = [0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v ** 3))) for v in h.double().reshape(-1).tolist()]
    return torch.tensor(vals, dtype=torch.float64).reshape(h.shape)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of the 16-bit dtype at |x| (float64)."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[x.dtype]
    tiny = {torch.bfloat16: 2.0 ** -126, torch.float16: 2.0 ** -14}[x.dtype]
    a = x.double().abs().clamp_min(tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - mant)


def test_registered():
    assert PRODUCERS["gelu_tanh"] is gelu_tanh


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_rounds_once_from_float32(dtype, gen):
    h = _h(64, 256, dtype, gen)
    g = gelu_tanh(h)
    assert g.dtype == dtype and g.shape == h.shape
    ref = torch.nn.functional.gelu(h.float(), approximate="tanh")
    assert torch.equal(g, ref.to(dtype))
    # close to the float64 GELU: one unit of the 16-bit dtype, plus the float32 cancellation in 1 + tanh(inner)
    # for x < -4 (absolute error ~|x| 2^-24 per float32 rounding of tanh near -1: torch's formula, kept as is)
    err = (g.double() - _gelu64(h)).abs()
    assert bool((err <= _ulp(g) + h.double().abs() * 2.0 ** -22).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_special_values(dtype):
    big = 1e30 if dtype == torch.bfloat16 else 6e4
    h = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"), big, -big, 1.0, -1.0, -10.0],
                     dtype=dtype)
    g = gelu_tanh(h).float()
    assert g[0] == 0 and not torch.signbit(g[0]) and g[1] == 0 and torch.signbit(g[1])  # -0 stays -0
    assert g[2].isnan() and g[3] == float("inf") and g[4].isnan()  # -inf * (1 + tanh(-inf)) = -inf * 0
    # x^3 overflows to +-inf in float32: tanh(+-inf) = +-1, so GELU(big) = big and GELU(-big) = -0
    assert g[5] == torch.tensor(big, dtype=dtype).float() and g[6] == 0
    assert abs(g[7].item() - 0.8412) < 0.01 and abs(g[8].item() + 0.1588) < 0.01 and g[9] <= 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 64), (70, 264), (130, 1000)])
def test_gelu_compress_sm90_is_compress_of_gelu(m, k, dtype, gen):
    h = _h(m, k, dtype, gen)
    h[0, 3] = float("nan")
    values, meta, scale, x = sm90.gelu_compress_sm90(h, dense=True)
    assert torch.equal(x.view(torch.int16), gelu_tanh(h).view(torch.int16))
    rv, rmeta, rscale = sm90.compress_sm90(x)
    assert torch.equal(values.view(torch.int16), rv.view(torch.int16)) and torch.equal(meta, rmeta)
    torch.testing.assert_close(scale, rscale, equal_nan=True)
    dense = sm90.decompress_sm90(values, meta, k)
    ref = prune_nm(x)
    assert torch.equal(dense.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(dense), torch.nan_to_num(ref))
    torch.testing.assert_close(scale, norm_scale(x), equal_nan=True)
    assert len(sm90.gelu_compress_sm90(h)) == 3  # no dense output unless asked


def test_gelu_compress_padding_is_zero_groups(gen):
    h = _h(3, 136, torch.bfloat16, gen)
    values, meta, _ = sm90.gelu_compress_sm90(h)
    rows = sm90.sm90_meta_to_rows(meta, 3, 136)
    assert bool((rows[3:] == 0x44).all()) and bool((rows[:3, 136 // 8:] == 0x44).all())
    assert bool((values[:, 68:] == 0).all())  # GELU(0) = 0: the K padding stays zero


def test_fused_op_fake_shapes_on_meta_device():
    import rtlynx.ops as ops
    from rtlynx.ops import sm90 as k90

    h = torch.empty(333, 12288, dtype=torch.bfloat16, device="meta")
    values, meta, scale = ops.gelu_prune_compress(h)
    assert values.shape == (333, 6144) and meta.shape == (384 * 12288 // 8,) and scale.shape == (333,)
    v, mt, s, y = ops.gelu_prune_compress(h, dense=True)
    assert y.shape == (333, 12288) and y.dtype == torch.bfloat16
    assert k90.gelu_prune_compress_sm90(h, True, 1e-8)[3].shape == (0, 12288)
    w = torch.empty(3072, 12288, dtype=torch.bfloat16, device="meta")
    out = ops.lynx_gelu_linear(h, w, None)
    assert out.shape == (333, 3072)


def test_fused_op_unsupported():
    import rtlynx.ops as ops

    with pytest.raises(ops.Unsupported):
        ops.gelu_prune_compress(torch.empty(4, 100, dtype=torch.bfloat16, device="meta"))  # K % 8
    with pytest.raises(ops.Unsupported):
        ops.gelu_prune_compress(torch.empty(4, 64, dtype=torch.float32, device="meta"))
    with pytest.raises(ops.Unsupported):
        ops.lynx_gelu_linear(torch.empty(4, 64, dtype=torch.bfloat16, device="meta"),
                             torch.empty(12, 64, dtype=torch.bfloat16, device="meta"), None)  # N % 8
