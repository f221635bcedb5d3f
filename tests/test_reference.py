import math

import pytest
import torch

from conftest import brute_mask
from rtlynx import reference as R

PATTERNS = [(2, 4), (1, 4), (4, 8), (8, 16), (1, 2)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_matches_bruteforce(n, m, dtype, gen):
    x = torch.randn(7, 5 * m, generator=gen).to(dtype)
    assert torch.equal(R.nm_mask(x, n, m), brute_mask(x, n, m))


@pytest.mark.parametrize("n,m", PATTERNS)
def test_mask_ties_lower_index_wins(n, m, gen):
    # Small integers make many exact ties.
    x = torch.randint(-2, 3, (9, 4 * m), generator=gen).float()
    mask = R.nm_mask(x, n, m)
    assert torch.equal(mask, brute_mask(x, n, m))
    assert (mask.reshape(9, -1, m).sum(-1) == n).all()


def test_all_equal_group_keeps_first_n():
    x = torch.ones(1, 8)
    assert R.nm_mask(x, 2, 4).tolist() == [[True, True, False, False] * 2]


def test_nan_and_inf_rank_highest_and_propagate():
    x = torch.tensor([[1.0, float("nan"), 5.0, 2.0, float("inf"), 0.0, -9.0, float("nan")]])
    p = R.prune_nm(x, 2, 4)
    assert torch.isnan(p[0, 1]) and p[0, 2] == 5 and p[0, 0] == 0 and p[0, 3] == 0
    assert p[0, 4] == float("inf") and torch.isnan(p[0, 7]) and p[0, 6] == 0
    assert torch.isnan(R.norm_scale(x)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_keeps_values_and_dtype(dtype, gen):
    x = torch.randn(3, 4, 32, generator=gen).to(dtype)
    p = R.prune_nm(x)
    mask = R.nm_mask(x)
    assert p.dtype == dtype and p.shape == x.shape
    assert torch.equal(p[mask], x[mask]) and (p[~mask] == 0).all()
    # kept magnitudes dominate dropped ones inside every group
    g_keep = torch.where(mask, x.abs(), torch.full_like(x, float("inf"))).reshape(-1, 4).min(-1).values
    g_drop = torch.where(~mask, x.abs(), torch.full_like(x, -1)).reshape(-1, 4).max(-1).values
    assert (g_keep >= g_drop).all()


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_compress_roundtrip(n, m, dtype, lead, gen):
    k = 6 * m
    x = torch.randn(*lead, k, generator=gen).to(dtype)
    values, meta = R.compress(x, n, m)
    assert values.shape == (*lead, k * n // m) and values.dtype == dtype
    assert meta.dtype == torch.uint8 and meta.shape == (*lead, R.meta_bytes_per_row(k, n, m))
    assert torch.equal(R.decompress(values, meta, n, m), R.prune_nm(x, n, m))


def test_metadata_layout_24_is_ptx_nibbles():
    x = torch.tensor([[0.0, 3.0, 0.0, -5.0, 7.0, 0.0, 1.0, 0.0]])
    values, meta = R.compress(x)
    assert values.tolist() == [[3.0, -5.0, 7.0, 1.0]]
    # group 0 keeps (1, 3) -> 1 | 3 << 2 = 13 (low nibble); group 1 keeps (0, 2) -> 0 | 2 << 2 = 8
    assert meta.tolist() == [[13 | 8 << 4]]


def test_metadata_layout_48_uses_4bit_indices():
    x = torch.tensor([[0.0, 9.0, 0.0, 0.0, 8.0, 7.0, 0.0, 6.0]])
    values, meta = R.compress(x, 4, 8)
    assert values.tolist() == [[9.0, 8.0, 7.0, 6.0]]
    assert meta.tolist() == [[1 | 4 << 4, 5 | 7 << 4]]


def test_decompress_rejects_bad_metadata():
    x = torch.randn(2, 16)
    v, meta = R.compress(x, 4, 8)
    with pytest.raises(TypeError):
        R.decompress(v, meta.to(torch.int32), 4, 8)
    with pytest.raises(ValueError, match="shape"):
        R.decompress(v, meta[:, :1], 4, 8)
    bad = meta.clone()
    bad[0, 0] = 0xFF  # index 15 in a group of 8
    with pytest.raises(ValueError, match="corrupt"):
        R.decompress(v, bad, 4, 8)


@pytest.mark.parametrize("n,m", PATTERNS)
def test_norm_scale_formula_and_range(n, m, gen):
    x = torch.randn(6, 8 * m, generator=gen)
    s = R.norm_scale(x, n=n, m=m)
    xd, pd = x.double(), R.prune_nm(x, n, m).double()
    expect = (xd.pow(2).sum(-1) / (pd.pow(2).sum(-1) + 1e-8)).sqrt()
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.double(), expect, rtol=1e-6, atol=0)
    assert (s >= 1 - 1e-6).all() and (s <= math.sqrt(m / n) + 1e-6).all()


def test_bad_input_errors():
    with pytest.raises(ValueError):
        R.nm_mask(torch.randn(4, 8), 4, 4)
    with pytest.raises(ValueError):
        R.nm_mask(torch.randn(4, 9), 1, 3)
    with pytest.raises(TypeError):
        R.nm_mask(torch.randn(4, 8), 2.0, 4)
    with pytest.raises(TypeError, match="floating"):
        R.prune_nm(torch.arange(8).reshape(2, 4))
    with pytest.raises(ValueError, match="multiple"):
        R.prune_nm(torch.randn(2, 6))


def test_weight_baselines(gen):
    w = torch.randn(16, 32, generator=gen)
    assert torch.equal(R.prune_weight_magnitude(w), R.prune_nm(w))
    act = torch.ones(32)
    assert torch.equal(R.prune_weight_wanda(w, act), R.prune_nm(w))  # uniform channel norms = magnitude
    act = torch.rand(32, generator=gen) * 10
    wp = R.prune_weight_wanda(w, act)
    assert torch.equal(wp != 0, brute_mask(w.abs() * act, 2, 4))
    with pytest.raises(ValueError):
        R.prune_weight_wanda(w, torch.ones(31))


def test_channel_norm(gen):
    x = torch.randn(3, 5, 8, generator=gen)
    torch.testing.assert_close(R.channel_norm(x), x.reshape(-1, 8).norm(dim=0))


@pytest.mark.parametrize("compensation", ["none", "norm"])
def test_sparse_act_linear_composition(compensation, gen):
    x, w, b = torch.randn(5, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    a, bb = torch.randn(3, 16, generator=gen), torch.randn(8, 3, generator=gen)
    y = R.sparse_act_linear(x, w, b, compensation=compensation, lora_a=a, lora_b=bb)
    xp = x * brute_mask(x, 2, 4)
    s = (x.pow(2).sum(-1) / (xp.pow(2).sum(-1) + 1e-8)).sqrt() if compensation == "norm" else torch.ones(5)
    expect = s[:, None] * (xp @ w.T) + b + (x @ a.T) @ bb.T
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        R.sparse_act_linear(x, w, compensation="bogus")


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_both_mask_algorithms_agree_with_bruteforce(n, m, dtype, gen):
    from rtlynx.reference import nm

    x = torch.randint(-3, 4, (6, 4 * m), generator=gen).to(dtype) * torch.randn(6, 4 * m, generator=gen).sign().to(dtype)
    x[0, 1], x[1, 0], x[2, 2] = float("nan"), float("inf"), -float("inf")
    bits = nm._order_bits(x)
    want = brute_mask(x, n, m)
    for algo in (nm._mask_topk, nm._mask_compare):
        assert torch.equal(algo(bits, n, m).reshape(x.shape), want), algo.__name__


def test_inf_bits_table_matches_the_dtypes():
    from rtlynx.reference.nm import _INF_BITS, _INT_VIEW

    for dt, bits in _INF_BITS.items():
        assert torch.tensor(float("inf"), dtype=dt).view(_INT_VIEW[dt]).item() == bits


# ---------------------------------------------------------------- centred pruning (issue 18 item 3, reference only)
@pytest.mark.parametrize("shape", [(1, 8), (7, 24), (2, 5, 64), (3, 0, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_centred_linear_matches_bruteforce(shape, dtype):
    """prune(x - c) with x - c rounded to the dtype, its own norm scale, c W^T added: against a float64 brute force."""
    x = (torch.randn(shape) * 3 + torch.randn(shape[-1]) * 5).to(dtype)  # a shared offset, as AdaLN / GELU give
    w, b = torch.randn(11, shape[-1]), torch.randn(11)
    c = R.token_mean(x) if x.shape[-2] else torch.zeros(*shape[:-2], 1, shape[-1])
    got = R.sparse_act_linear(x, w.to(dtype), b.to(dtype), centre=c, compute_dtype=torch.float32)
    xs = (x.double() - c.double()).to(dtype).double().reshape(-1, shape[-1])  # rounded once to the dtype
    kept = xs * brute_mask(xs, 2, 4)
    s = torch.sqrt((xs ** 2).sum(-1) / ((kept ** 2).sum(-1) + 1e-8))
    cw = (c.double() @ w.to(dtype).double().T).expand(*shape[:-1], 11).reshape(-1, 11)
    want = (kept @ w.to(dtype).double().T) * s[:, None] + cw + b.to(dtype).double()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert got.shape == (*shape[:-1], 11)
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.double().reshape(-1, 11), want, rtol=tol, atol=tol * scale)


def test_centred_linear_is_exact_where_x_minus_c_is_sparse():
    """x = c + (a 2:4 sparse part), all values small dyadic numbers: the centred layer gives the dense product."""
    g = torch.Generator().manual_seed(7)
    sp = torch.randint(-8, 9, (6, 32), generator=g).float() / 4
    sp = sp * R.nm_mask(torch.rand(6, 32, generator=g), 2, 4)  # exactly 2 of every 4 non-zero at most
    c = torch.randint(-8, 9, (1, 32), generator=g).float() / 2
    x, w = sp + c, torch.randint(-4, 5, (5, 32), generator=g).float() / 4
    got = R.sparse_act_linear(x, w, compensation="none", centre=c)
    torch.testing.assert_close(got, x @ w.T, rtol=0, atol=0)
    plain = R.sparse_act_linear(x, w, compensation="none")  # uncentred: the offset is pruned away
    assert (plain - x @ w.T).abs().max() > 1


def test_centre_zero_is_the_plain_layer_and_bad_centre_raises():
    x, w = torch.randn(5, 16).bfloat16(), torch.randn(3, 16).bfloat16()
    a, bb = torch.randn(2, 16).bfloat16(), torch.randn(3, 2).bfloat16()
    plain = R.sparse_act_linear(x, w, None, lora_a=a, lora_b=bb)
    assert torch.equal(R.sparse_act_linear(x, w, None, lora_a=a, lora_b=bb, centre=torch.zeros(16)), plain)
    with pytest.raises(ValueError, match="centre has 8 features"):
        R.sparse_act_linear(x, w, centre=torch.zeros(8))
    assert R.token_mean(x).shape == (1, 16) and R.token_mean(x.reshape(1, 5, 16)).shape == (1, 1, 16)
