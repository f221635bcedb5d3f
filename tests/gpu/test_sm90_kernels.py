"""Hopper lynx kernels against the pure-torch reference: bitwise for prune/compress, fp32-product tolerance for
the GEMMs; fuzzed shapes, special values, poisoned outputs, opcheck, torch.compile and CUDA graph capture."""

import pytest
import torch

from rtlynx import ops
from rtlynx.ops import sm90 as k90
from rtlynx.reference import prune_nm, sparse_act_linear
from rtlynx.reference import sm90 as ref90

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def gen():
    g = torch.Generator(device="cuda")
    g.manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    return g


def rnd(shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)


def poison_allocator(nbytes=256 << 20):
    """Fill the caching allocator's free blocks with NaN so an unwritten output element shows up."""
    t = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del t


def special(x):
    """NaN, +-Inf, ties and zero groups in a few rows."""
    m, k = x.shape
    if m > 3 and k >= 16:
        x[1, 2] = float("nan")
        x[2, 5] = float("inf")
        x[2, 6] = float("-inf")
        x[3, 0:4] = 0.0
        x[3, 4:8] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=x.dtype)
        x[3, 8:12] = torch.tensor([0.5, 2.0, -2.0, 2.0], dtype=x.dtype)
    return x


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------- prune/compress
PRUNE_SHAPES = [(1, 64), (3, 200), (7, 128), (64, 256), (65, 520), (333, 3072), (300, 3840), (129, 15360),
                (4224, 136), (2, 8), (512, 3072), (2100, 1000), (4608, 3072), (4096, 64)]  # every row width


@pytest.fixture(params=[3, 2], ids=["prune_v3", "prune_v2"])
def prune_impl(request):
    from rtlynx.ops import _lib

    old = _lib.set_prune_impl(request.param)
    yield request.param
    _lib.set_prune_impl(old)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", PRUNE_SHAPES)
def test_prune_compress_bitwise(m, k, dtype, gen, prune_impl):
    x = special(rnd((m, k), dtype, gen))
    poison_allocator()
    values, meta, scale = ops.prune_compress(x)
    rv, rmeta, rscale = ref90.compress_sm90(x)
    assert values.shape == rv.shape and meta.shape == rmeta.shape
    assert torch.equal(values.view(torch.int16), rv.view(torch.int16)), "values differ"
    assert torch.equal(meta, rmeta), "metadata differs"
    torch.testing.assert_close(scale, rscale, rtol=3e-5, atol=0, equal_nan=True)  # fp32 sums, other order


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
def test_prune_lora_tail(dtype, norm, gen, prune_impl):
    m, k, r = 77, 384, 64
    x = rnd((m, k), dtype, gen)
    x[5] = 0.0  # s = 0 row: tail must be 0, not NaN
    h = rnd((m, r), dtype, gen)
    h[5] = 0.0
    values, meta, scale = k90.prune_compress_sm90(x, h, norm, 1e-8)
    kp = 384
    rv, rmeta, _ = ref90.compress_sm90(x)
    assert torch.equal(values[:, : kp // 2].view(torch.int16), rv.view(torch.int16))
    tail = ref90.lora_tail(h, scale if norm else None)
    assert torch.equal(values[:, kp // 2:].view(torch.int16), tail.view(torch.int16))
    rows = ref90.sm90_meta_to_rows(meta, m, kp + 2 * r)
    assert torch.equal(rows[:, : kp // 8], ref90.sm90_meta_to_rows(rmeta, m, kp))
    assert bool((rows[:, kp // 8:] == ref90.TAIL_META_BYTE).all())  # slots 0 and 2 of every tail group
    if not norm:
        assert bool((scale == 1).all())


# ------------------------------------------------------------------------------------------- GEMM
def _gemm_case(m, n, k, dtype, gen, bias=True, norm=True):
    x = rnd((m, k), dtype, gen)
    w = rnd((n, k), dtype, gen, scale=k ** -0.5)
    b = rnd((n,), dtype, gen) if bias else None
    values, meta, scale = ops.prune_compress(x)
    xp = prune_nm(x).float()
    ref = xp @ torch.nn.functional.pad(w, (0, ref90.round_up(k, 128) - k)).float()[:, :k].T
    if norm:
        ref = ref * scale.unsqueeze(1)
    if bias:
        ref = ref + b.float()
    return values, meta, scale if norm else None, w, b, ref


@pytest.mark.parametrize("config", range(len(k90.CONFIG_NAMES)))
@pytest.mark.parametrize("m,n,k", [(1, 256, 128), (333, 3072, 3072), (300, 640, 1024), (4224, 3840, 512)])
def test_sparse_gemm_configs(config, m, n, k, gen):
    values, meta, scale, w, b, ref = _gemm_case(m, n, k, torch.bfloat16, gen)
    poison_allocator()
    y = k90.sparse_gemm_sm90(values, meta, ref90.expand_lora_b(w, None, k), scale, b, config)
    assert not y.isnan().any(), "unwritten or NaN output"
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("sched", [1 | 1 << 8, 2 | 2 << 8, 8 | 1 << 8])
def test_sparse_gemm_scheduler_options(sched, gen):
    values, meta, scale, w, b, ref = _gemm_case(1000, 1536, 1024, torch.bfloat16, gen)
    for config in range(len(k90.CONFIG_NAMES)):
        y = k90.sparse_gemm_sm90(values, meta, ref90.expand_lora_b(w, None, 1024), scale, b, config, sched)
        assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,norm", [(True, True), (False, True), (True, False), (False, False)])
def test_sparse_gemm_epilogue(dtype, bias, norm, gen):
    values, meta, scale, w, b, ref = _gemm_case(257, 512, 640, dtype, gen, bias, norm)
    y = k90.sparse_gemm_sm90(values, meta, ref90.expand_lora_b(w, None, 640), scale, b, -1)
    assert rel_err(y, ref) < 1e-2


# ------------------------------------------------------------------------------------------- full linear
LINEAR_SHAPES = [(1, 64, 64), (7, 200, 136), (333, 3072, 3072), (300, 1024, 520), (129, 3072, 15360),
                 (4224, 3840, 3840), (512, 12288, 3072), (5, 64, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", LINEAR_SHAPES)
@pytest.mark.parametrize("lora", [False, True])
def test_lynx_linear(m, n, k, dtype, lora, gen):
    x = rnd((m, k), dtype, gen)
    w = rnd((n, k), dtype, gen, scale=k ** -0.5)
    b = rnd((n,), dtype, gen)
    a = rnd((64, k), dtype, gen, scale=k ** -0.5) if lora else None
    bb = rnd((n, 64), dtype, gen, scale=0.1) if lora else None
    poison_allocator()
    y = ops.lynx_linear(x, w, b, True, a, bb)
    ref = sparse_act_linear(x, w, b, 2, 4, "norm", a, bb, compute_dtype=torch.float32)
    assert y.shape == (m, n) and y.dtype == dtype
    assert not y.isnan().any()
    assert rel_err(y, ref) < 1e-2


def test_lynx_linear_odd_k_and_rank(gen):
    m, n, k, r = 33, 96, 100, 24  # K % 8 != 0 (padded copy), rank not a multiple of 64
    x = rnd((m, k), torch.bfloat16, gen)
    w = rnd((n, k), torch.bfloat16, gen, scale=k ** -0.5)
    a = rnd((r, k), torch.bfloat16, gen, scale=k ** -0.5)
    bb = rnd((n, r), torch.bfloat16, gen, scale=0.1)
    y = ops.lynx_linear(x, w, None, True, a, bb)
    ref = sparse_act_linear(x, w, None, 2, 4, "norm", a, bb, compute_dtype=torch.float32)
    assert rel_err(y, ref) < 1e-2


def test_nan_inf_rows_propagate(gen):
    m, n, k = 64, 256, 512
    x = rnd((m, k), torch.bfloat16, gen)
    x[3, 17] = float("nan")
    x[9, 100] = float("inf")
    w = rnd((n, k), torch.bfloat16, gen, scale=k ** -0.5)
    y = ops.lynx_linear(x, w, None, True, None, None)
    assert bool(y[3].isnan().all()) and bool((~torch.isfinite(y[9])).all())
    ok = [i for i in range(m) if i not in (3, 9)]
    ref = sparse_act_linear(x[ok], w, None, compute_dtype=torch.float32)
    assert rel_err(y[ok], ref) < 1e-2


def test_weight_cache_sees_inplace_update(gen):
    m, n, k = 16, 128, 200
    x = rnd((m, k), torch.bfloat16, gen)
    w = rnd((n, k), torch.bfloat16, gen, scale=k ** -0.5)
    y1 = ops.lynx_linear(x, w, None, True, None, None)
    with torch.no_grad():
        w.mul_(2)
    y2 = ops.lynx_linear(x, w, None, True, None, None)
    assert rel_err(y2, 2 * y1.float()) < 1e-2


def test_unsupported():
    x = torch.randn(4, 64, device="cuda")
    w = torch.randn(8, 64, device="cuda")
    with pytest.raises(ops.Unsupported):
        ops.lynx_linear(x, w, None, True, None, None)  # fp32
    with pytest.raises(ops.Unsupported):
        ops.lynx_linear(x.half(), w.half(), None, True, None, None, n=2, m=8)
    with pytest.raises(ops.Unsupported):
        ops.lynx_linear(x.half(), torch.randn(12, 64, device="cuda").half(), None, True, None, None)  # N % 8


# ------------------------------------------------------------------------------------------- torch integration
def test_opcheck(gen):
    x = rnd((70, 256), torch.bfloat16, gen)
    h = rnd((70, 64), torch.bfloat16, gen)
    w = rnd((128, 256), torch.bfloat16, gen)
    b = rnd((128,), torch.bfloat16, gen)
    a = rnd((64, 256), torch.bfloat16, gen)
    bb = rnd((128, 64), torch.bfloat16, gen)
    torch.library.opcheck(k90.prune_compress_sm90, (x, None, True, 1e-8))
    torch.library.opcheck(k90.prune_compress_sm90, (x, h, True, 1e-8))
    v, mt, s = ops.prune_compress(x)
    torch.library.opcheck(k90.sparse_gemm_sm90, (v, mt, w, s, b, -1))
    torch.library.opcheck(k90.sparse_gemm_sm90, (v, mt, w, None, None, 0))
    torch.library.opcheck(k90.sparse_linear_sm90, (x, w, b, a, bb, True, 1e-8))


def test_torch_compile(gen):
    x = rnd((333, 512), torch.bfloat16, gen)
    w = rnd((256, 512), torch.bfloat16, gen, scale=512 ** -0.5)
    b = rnd((256,), torch.bfloat16, gen)

    def f(x):
        return torch.nn.functional.gelu(ops.lynx_linear(x * 2, w, b, True, None, None))

    y = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(y, f(x))


def test_cuda_graph_capture(gen):
    m, n, k = 300, 512, 1024
    x = rnd((m, k), torch.bfloat16, gen)
    w = rnd((n, k), torch.bfloat16, gen, scale=k ** -0.5)
    b = rnd((n,), torch.bfloat16, gen)
    a = rnd((64, k), torch.bfloat16, gen, scale=k ** -0.5)
    bb = rnd((n, 64), torch.bfloat16, gen, scale=0.1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: library load, weight cache
            ops.lynx_linear(x, w, b, True, a, bb)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ops.lynx_linear(x, w, b, True, a, bb)
    x.copy_(rnd((m, k), torch.bfloat16, gen))
    g.replay()
    torch.cuda.synchronize()
    ref = ops.lynx_linear(x, w, b, True, a, bb)
    assert torch.equal(y, ref)
