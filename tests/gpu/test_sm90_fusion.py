"""Producer-fused prune kernel (rtlynx::gelu_prune_compress_sm90) against its pure-torch twin
(rtlynx.reference.sm90.gelu_compress_sm90, evaluated on the same GPU): bitwise values / metadata / dense GELU output,
every 16-bit encoding through the GELU, awkward shapes, NaN/Inf, poisoned outputs, opcheck, compile, graphs."""

import pytest
import torch

from rtlynx import ops
from rtlynx.ops import sm90 as k90
from rtlynx.reference import gelu_tanh, sparse_act_linear
from rtlynx.reference import sm90 as ref90

from .test_sm90_kernels import DTYPES, gen, prune_impl, rnd  # noqa: F401 (fixtures)


def poison_allocator(nbytes=256 << 20):
    """Fill the caching allocator's free blocks with 0xA5 bytes (a plausible bf16/fp16 value, not NaN, and invalid
    2:4 metadata nibbles), so an unwritten output element shows up as a mismatch."""
    t = torch.full((nbytes,), 0xA5, dtype=torch.uint8, device="cuda")
    del t


def special(h):
    """NaN, +-Inf, huge values (x^3 overflows), GELU ties and zero groups in a few rows of the pre-activation."""
    m, k = h.shape
    big = 1e30 if h.dtype == torch.bfloat16 else 6e4
    if m > 4 and k >= 16:
        h[1, 2] = float("nan")
        h[2, 5] = float("inf")
        h[2, 6] = float("-inf")  # GELU(-inf) = NaN (-inf * 0), as in torch
        h[3, 0:4] = 0.0
        h[3, 4:8] = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=h.dtype)  # three equal GELUs: lower indices win
        h[3, 8:12] = torch.tensor([big, -big, -30.0, 0.5], dtype=h.dtype)
        h[4, 0:4] = torch.tensor([-0.0, 0.0, -5.0, -12.0], dtype=h.dtype)  # -0, tiny and -0 GELU outputs
    return h


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


SHAPES = [(1, 64), (3, 200), (7, 128), (65, 520), (129, 15360), (300, 3840), (333, 3072), (2, 8), (4224, 136),
          (2100, 1000), (512, 12288), (4096, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("dense", [False, True], ids=["sparse_only", "dense_out"])
def test_gelu_prune_compress_bitwise(m, k, dtype, dense, gen, prune_impl):
    h = special(rnd((m, k), dtype, gen, scale=2.0))
    poison_allocator()
    values, meta, scale, y = k90.gelu_prune_compress_sm90(h, True, 1e-8, dense)
    rv, rmeta, rscale, rx = ref90.gelu_compress_sm90(h, dense=True)
    assert same_bits(values, rv), "values differ"
    assert torch.equal(meta, rmeta), "metadata differs"
    # fp32 sums in another order; the 1e30 row of special() overflows float32 and is summed again scaled
    torch.testing.assert_close(scale, rscale, rtol=3e-5, atol=0, equal_nan=True)
    if dense:
        assert same_bits(y, rx), "dense GELU output differs"
    else:
        assert y.shape == (0, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_every_encoding(dtype):
    """All 65536 bit patterns of the dtype through the fused GELU: bitwise equal to torch's F.gelu on CUDA."""
    h = torch.arange(-32768, 32768, dtype=torch.int32, device="cuda").to(torch.int16).view(dtype).reshape(256, 256)
    values, meta, scale, y = k90.gelu_prune_compress_sm90(h.contiguous(), True, 1e-8, True)
    ref = gelu_tanh(h)
    direct = torch.nn.functional.gelu(h, approximate="tanh")  # what FeedForward runs on a bf16/fp16 model
    bad = (y.view(torch.int16) != ref.view(torch.int16)).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} encodings differ, first h={h[tuple(bad[0])].item()}"
    assert same_bits(ref, direct)
    rv, rmeta, _ = ref90.compress_sm90(ref)
    assert same_bits(values, rv) and torch.equal(meta, rmeta)


def test_gelu_prune_compress_strided_input(gen):
    """A row stride wider than K (a column slice of a wider buffer) straight into the op."""
    buf = rnd((100, 640), torch.bfloat16, gen)
    h = buf[:, 128:512]
    values, meta, scale, _ = k90.gelu_prune_compress_sm90(h, True, 1e-8)
    rv, rmeta, rscale = ref90.gelu_compress_sm90(h.contiguous())
    assert same_bits(values, rv) and torch.equal(meta, rmeta)


@pytest.mark.parametrize("norm", [True, False])
def test_gelu_prune_no_norm(norm, gen):
    h = rnd((77, 384), torch.bfloat16, gen)
    h[5] = -30.0  # GELU row of -0: s = 0 (norm), 1 (no norm)
    values, meta, scale, _ = k90.gelu_prune_compress_sm90(h, norm, 1e-8)
    rv, rmeta, rscale = ref90.gelu_compress_sm90(h)
    assert same_bits(values, rv) and torch.equal(meta, rmeta)
    if norm:
        torch.testing.assert_close(scale, rscale, rtol=3e-5, atol=0)
    else:
        assert bool((scale == 1).all())


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (333, 3072, 3072), (129, 512, 1000), (512, 3072, 12288)])
def test_lynx_gelu_linear(m, n, k, gen):
    h = rnd((m, k), torch.bfloat16, gen, scale=2.0)
    w = rnd((n, k), torch.bfloat16, gen, scale=k ** -0.5)
    b = rnd((n,), torch.bfloat16, gen)
    poison_allocator()
    y = ops.lynx_gelu_linear(h, w, b, True)
    x = gelu_tanh(h)
    ref = sparse_act_linear(x, w, b, 2, 4, "norm", compute_dtype=torch.float32)
    assert y.shape == (m, n) and not y.isnan().any()
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    # same result as the unfused path (GELU pass, then prune): identical compressed operand and GEMM
    assert torch.equal(y, ops.lynx_linear(x, w, b, True, None, None))


def test_unsupported_fused():
    with pytest.raises(ops.Unsupported):
        ops.gelu_prune_compress(torch.randn(4, 100, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(ops.Unsupported):
        ops.gelu_prune_compress(torch.randn(4, 64, device="cuda"))


def test_opcheck_compile_graph(gen):
    h = rnd((70, 256), torch.bfloat16, gen)
    torch.library.opcheck(k90.gelu_prune_compress_sm90, (h, True, 1e-8, False))
    torch.library.opcheck(k90.gelu_prune_compress_sm90, (h, True, 1e-8, True))
    w = rnd((128, 256), torch.bfloat16, gen, scale=256 ** -0.5)

    def f(h):
        return ops.lynx_gelu_linear(h * 2, w, None, True)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(h), f(h))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f(h)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = f(h)
    h.copy_(rnd((70, 256), torch.bfloat16, gen))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, f(h))
