"""The CPU's pairwise-comparison N:M selection (reference.nm._mask_pairs) gives the masks of the top-k and
m-pass algorithms bit for bit, ties, NaN, Inf and signed zeros included; and the brute-force definition on small
inputs (tests/test_reference.py's brute_mask: sort by (-|x| with NaN = inf, index), keep the first n)."""


import pytest
import torch

from rtlynx.reference import nm
from test_reference import PATTERNS, brute_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _hostile(shape, dtype, gen):
    """Few distinct magnitudes (many ties), both signs, and some NaN / +-Inf / -0.0."""
    x = torch.randint(-3, 4, shape, generator=gen).to(dtype)
    x = x * torch.randn(shape, generator=gen).sign().to(dtype)
    flat = x.view(-1)
    if not flat.numel():
        return x
    for value in (float("nan"), float("inf"), -float("inf"), -0.0):
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=gen)
        flat[idx] = value
    return x


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pairs_equal_bruteforce(n, m, dtype, gen):
    x = _hostile((7, 5 * m), dtype, gen)
    assert torch.equal(nm._mask_pairs(nm._order_bits(x), n, m).reshape(x.shape), brute_mask(x, n, m))


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pairs_equal_the_other_algorithms_on_many_inputs(n, m, dtype, gen):
    for trial in range(20):
        x = _hostile((int(torch.randint(0, 9, (1,), generator=gen)), 3, 8 * m), dtype, gen)
        if trial % 2:
            x = torch.randn(x.shape, generator=gen).to(dtype)  # ties only by rounding
        bits = nm._order_bits(x)
        want = nm._mask_compare(bits, n, m)
        assert torch.equal(nm._mask_pairs(bits, n, m), want)
        if dtype != torch.float64:  # top-k needs room for the index beside the bits
            assert torch.equal(nm._mask_topk(bits, n, m), want)
        assert torch.equal(nm.nm_mask(x, n, m), want.reshape(x.shape))  # the CPU path takes the pairs
