"""The lynx ops refuse bad operands before a raw address reaches a kernel. On the CPU the checks run on meta
tensors (the ops' fakes call the same checks as their CUDA implementations); tests/gpu/test_op_checks_gpu.py runs
each refusal on the device, tests/gpu/sanitize_checks.py under compute-sanitizer."""

import pytest
import torch

from rtlynx import ops
from rtlynx.ops import _checks
from rtlynx.ops import sm90 as k90

BF = torch.bfloat16


def meta(*shape, dtype=BF):
    return torch.empty(*shape, device="meta", dtype=dtype)


def gemm_operands(m=70, n=64, kg=256):
    mp = (m + 63) // 64 * 64
    return meta(m, kg // 2), meta(mp * kg // 8, dtype=torch.uint8), meta(n, kg), meta(m, dtype=torch.float32), meta(n)


def test_gemm_accepts_good_operands():
    y = k90.sparse_gemm_sm90(*gemm_operands())
    assert y.shape == (70, 64) and y.dtype == BF


@pytest.mark.parametrize("slot,bad,match", [
    (1, meta(128 * 256 // 8 - 1, dtype=torch.uint8), r"meta .* must be a contiguous \[4096\]"),  # one byte short
    (1, meta(64 * 256 // 8, dtype=torch.uint8), r"meta .* \[4096\]"),                           # M not padded to 64
    (1, meta(4096, dtype=torch.int8), "meta .* must be uint8"),
    (1, torch.empty(4096, dtype=torch.uint8), "not on the input's device"),
    (2, meta(64, 256, dtype=torch.float16), "weight .* must be bfloat16"),
    (2, meta(256, 64).t(), "row-major"),                                                       # transposed view
    (2, meta(64, 200), "multiple of 128"),
    (2, meta(60, 256), "multiple of 8"),
    (2, torch.empty(64, 256, dtype=BF), "not on the input's device"),
    (3, meta(70, dtype=BF), "scale .* must be float32"),
    (3, meta(71, dtype=torch.float32), r"scale .* \[70\]"),
    (3, meta(140, dtype=torch.float32)[::2], r"contiguous \[70\]"),
    (4, meta(64, dtype=torch.float16), "bias .* must be bfloat16"),
    (4, meta(32), r"bias .* \[64\]"),
    (4, torch.empty(64, dtype=BF), "not on the input's device"),
    (0, meta(70, 100), r"values .* must be \[\*, 128\]"),
    (0, meta(70, 256)[:, ::2], "row-major"),
])
def test_gemm_refuses(slot, bad, match):
    args = list(gemm_operands())
    args[slot] = bad
    with pytest.raises(ops.Unsupported, match=match):
        k90.sparse_gemm_sm90(*args)


def test_prune_and_linear_refuse():
    x = meta(5, 256)
    with pytest.raises(ops.Unsupported, match="row-major"):
        k90.prune_compress_sm90(meta(256, 5).t(), None, True, 1e-8)
    with pytest.raises(ops.Unsupported, match="h .* must be"):
        k90.prune_compress_sm90(x, meta(6, 64), True, 1e-8)
    w = meta(64, 256)
    assert k90.sparse_linear_sm90(x, w, meta(64), None, None, True, 1e-8).shape == (5, 64)
    for args, match in (((x, w, meta(64, dtype=torch.float32), None, None), "bias .* must be bfloat16"),
                        ((x, w, None, meta(16, 256), None), "together"),
                        ((x, w, None, meta(16, 256), meta(64, 8)), "LoRA shapes"),
                        ((x, w, None, meta(16, 256), torch.empty(64, 16, dtype=BF)), "lora_b .* not on the input"),
                        ((x, meta(64, 240), None, None, None), "does not fit")):
        with pytest.raises(ops.Unsupported, match=match):
            k90.sparse_linear_sm90(*args, True, 1e-8)
    # a weight the GEMM does not read in place (K' = 100 < K = 104, x zero-padded; or a LoRA): a padded copy is
    # made, so its row stride need not be 16 bytes; one it reads in place must be
    x104 = meta(5, 104)
    assert k90.sparse_linear_sm90(x104, meta(96, 100), None, None, None, True, 1e-8).shape == (5, 96)
    with pytest.raises(ops.Unsupported, match="N must be a multiple of 8"):
        k90.sparse_linear_sm90(x104, meta(90, 100), None, None, None, True, 1e-8)
    with pytest.raises(ops.Unsupported, match="row-major"):
        k90.sparse_linear_sm90(x, meta(256, 64).t(), None, None, None, True, 1e-8)


def test_public_ops_refuse_operands_on_another_device():
    x = meta(5, 256)
    w = meta(64, 256)
    cpu = torch.empty(64, 256, dtype=BF)
    with pytest.raises(ops.Unsupported, match="weight .* not on the input's device"):
        ops.lynx_linear(x, cpu, None, True, None, None)
    with pytest.raises(ops.Unsupported, match="bias .* not on the input's device"):
        ops.lynx_linear(x, w, torch.empty(64, dtype=BF), True, None, None)
    with pytest.raises(ops.Unsupported, match="lora_a .* not on the input's device"):
        ops.lynx_linear(x, w, None, True, torch.empty(16, 256, dtype=BF), meta(64, 16))
    with pytest.raises(ops.Unsupported, match="weight .* not on the input's device"):
        ops.lynx_gelu_linear(x, cpu, None)
    with pytest.raises(ops.Unsupported, match=r"bias must be \[64\]"):
        ops.lynx_gelu_linear(x, w, meta(32))  # read as 64 values by the epilogue before this check
    with pytest.raises(ops.Unsupported, match="site operand .* not on the input's device"):
        ops.lynx_site_linear(x, cpu, None, None, (64,))
    with pytest.raises(ops.Unsupported, match="site bias .* not on the input's device"):
        ops.lynx_site_linear(x, w, torch.empty(64, dtype=BF), None, (64,))
    with pytest.raises(ops.Unsupported, match="site operand .* row-major"):
        ops.lynx_site_gelu(x, meta(256, 64).t(), None)


def test_site_ops_check_in_their_fakes():
    x = meta(5, 256)
    assert [t.shape for t in k90.sparse_site_sm90(x, meta(64, 256), None, None, [32, 32], True, 1e-8)] == \
        [(5, 32), (5, 32)]
    with pytest.raises(ops.Unsupported, match="splits"):
        k90.sparse_site_sm90(x, meta(64, 256), None, None, [32, 24], True, 1e-8)
    with pytest.raises(ops.Unsupported, match="site lora_a"):
        k90.sparse_site_sm90(x, meta(64, 384), None, meta(64, 200), [64], True, 1e-8)
    with pytest.raises(ops.Unsupported, match="site bias"):
        k90.gelu_site_sm90(x, meta(64, 256), meta(64, dtype=torch.float16), True, 1e-8)


def test_check_helpers_directly():
    """The helpers new ops call: each names the operand and what is wrong."""
    x = meta(3, 64)
    _checks.check_rows(meta(3, 72)[:, :64], "w", x, 3, 64)  # a row stride of 72 (a multiple of 8) is fine
    with pytest.raises(ops.Unsupported, match="w .* row stride"):
        _checks.check_rows(meta(3, 68)[:, :64], "w", x, 3, 64)
    with pytest.raises(ops.Unsupported, match=r"v .* \[3\]"):
        _checks.check_vector(meta(4), "v", x, 3)
    with pytest.raises(ops.Unsupported, match="must be a tensor"):
        _checks.check_tensor([1, 2], "v", x)
    with pytest.raises(ops.Unsupported, match="bf16/fp16"):
        _checks.check_activation(meta(3, 64, dtype=torch.float32))


# ------------------------------------------------------------------------------------------ FP8 (rtlynx.ops.fp8)
F8 = torch.float8_e4m3fn


def fp8_gemm_operands(m=70, n=64, kg=256):
    mp = (m + 63) // 64 * 64
    return (meta(m, kg // 2, dtype=F8), meta(mp * kg // 8, dtype=torch.uint8), meta(n, kg, dtype=F8),
            meta(m, dtype=torch.float32), meta(n, dtype=torch.float32), meta(n))


def test_fp8_gemm_accepts_good_operands():
    from rtlynx.ops import fp8 as kf8

    y = kf8.sparse_gemm_fp8_sm90(*fp8_gemm_operands())
    assert y.shape == (70, 64) and y.dtype == BF
    args = fp8_gemm_operands(m=0)  # an empty batch: the producer's metadata is still one 64-row block
    assert kf8.sparse_gemm_fp8_sm90(args[0], meta(64 * 256 // 8, dtype=torch.uint8), *args[2:]).shape == (0, 64)


@pytest.mark.parametrize("slot,bad,match", [
    (0, meta(70, 128), "values must be a 2-D float8_e4m3fn"),
    (0, meta(70, 256, dtype=F8)[:, :128], r"values .* must be packed \(row stride 128\)"),
    (0, meta(70, 100, dtype=F8), r"values .* must be \[\*, 128\]"),
    (1, meta(128 * 256 // 8 - 1, dtype=torch.uint8), r"meta .* must be a contiguous \[4096\]"),
    (2, meta(64, 256), "wq .* must be float8_e4m3fn"),
    (2, meta(64, 200, dtype=F8), "multiple of 128"),
    (2, meta(60, 256, dtype=F8), "multiple of 8"),
    (2, meta(64, 264, dtype=F8)[:, :256], "row stride >= 256 and a multiple of 16"),  # 16 e4m3 = 16 bytes
    (2, torch.empty(64, 256, dtype=F8), "not on the input's device"),
    (3, meta(70, dtype=torch.float16), "rs .* must be float32"),
    (3, meta(71, dtype=torch.float32), r"rs .* \[70\]"),
    (4, meta(32, dtype=torch.float32), r"sw .* \[64\]"),
    (5, meta(64, dtype=torch.float32), "bias .* must be bfloat16"),
    (5, torch.empty(64, dtype=BF), "bias .* not on the input's device"),
])
def test_fp8_gemm_refuses(slot, bad, match):
    from rtlynx.ops import fp8 as kf8

    args = list(fp8_gemm_operands())
    args[slot] = bad
    with pytest.raises(ops.Unsupported, match=match):
        kf8.sparse_gemm_fp8_sm90(*args)


def test_fp8_prune_and_site_refuse():
    from rtlynx.ops import fp8 as kf8

    x, wq, sw = meta(5, 256), meta(64, 256, dtype=F8), meta(64, dtype=torch.float32)
    assert kf8.prune_quant_fp8_sm90(meta(256, 5).t(), True, 1e-8)[0].shape == (5, 128)  # any strides: copied
    assert [t.shape for t in kf8.fp8_site_sm90(x, wq, sw, meta(64), [32, 32], True, 1e-8)] == [(5, 32), (5, 32)]
    for call, match in (
            (lambda: kf8.prune_quant_fp8_sm90(meta(5, 256, dtype=torch.float16), True, 1e-8), "take bf16"),
            (lambda: kf8.prune_quant_fp8_sm90(meta(5, 100), True, 1e-8), "K % 8 == 0"),
            (lambda: kf8.prune_quant_fp8_sm90(meta(5, 16392), True, 1e-8), "K <= 16384"),
            (lambda: kf8.prune_quant_fp8_sm90(x, True, 1e-8, 2), "act must be 0"),
            (lambda: kf8.fp8_site_sm90(x, wq, sw, None, [32, 24], True, 1e-8), "splits"),
            (lambda: kf8.fp8_site_sm90(meta(5, 264), wq, sw, None, [64], True, 1e-8), r"needs \[N, >= 384\]"),
            (lambda: kf8.fp8_site_sm90(x, meta(64, 256), sw, None, [64], True, 1e-8), "wq .* must be float8"),
            (lambda: kf8.fp8_site_sm90(x, wq, meta(64), None, [64], True, 1e-8), "sw .* must be float32"),
            (lambda: kf8.fp8_site_sm90(x, wq, sw, meta(64, dtype=torch.float16), [64], True, 1e-8),
             "site bias .* must be bfloat16"),
            (lambda: ops.fp8_site(x, torch.empty(64, 256, dtype=F8), sw, None, [64]),
             "wq .* not on the input's device"),
            (lambda: ops.fp8_site(x, wq, torch.empty(64), None, [64]), "sw .* not on the input's device"),
            (lambda: ops.fp8_site(meta(5, 256, dtype=torch.float32), wq, sw, None, [64]), "bf16/fp16"),
            (lambda: ops.fp8_site(meta(5, 256, dtype=torch.float16), wq, sw, None, [64]), "take bf16")):
        with pytest.raises(ops.Unsupported, match=match):
            call()


def test_fp8_site_lora_tail_operands_are_checked():
    """The LoRA tail inside rtlynx::fp8_site_sm90 (its fake, on meta tensors): shapes unchanged with a tail, and
    each malformed tail operand refused in one line."""
    from rtlynx.ops import fp8 as kf8

    x, wq, sw = meta(5, 256), meta(64, 256, dtype=F8), meta(64, dtype=torch.float32)
    a, b0, b1 = meta(24, 256), meta(32, 8), meta(32, 16)
    outs = kf8.fp8_site_sm90(x, wq, sw, None, [32, 32], True, 1e-8, 0, a, [b0, b1], [0, 0, 8, 1, 8, 24])
    assert [t.shape for t in outs] == [(5, 32), (5, 32)]
    for args, match in (
            ((None, [b0], [0, 0, 8]), "without lora_a"),
            ((meta(24, 128), [b0], [0, 0, 8]), r"must be \[R, K=256\]"),
            ((meta(24, 256, dtype=torch.float16), [b0], [0, 0, 8]), "lora_a .* must be bfloat16"),
            ((a, [b0], [0, 0]), "three per term"),
            ((a, [b0], [2, 0, 8]), "out of range"),
            ((a, [b0], [0, 8, 8]), "out of range"),
            ((a, [b0], [0, 20, 28]), "out of range"),
            ((a, [b1], [0, 0, 8]), r"must be \[32, 8\]"),
            ((a, [meta(32, 8, dtype=torch.float32)], [0, 0, 8]), "B of term 0 .* must be bfloat16"),
            ((a, [torch.empty(32, 8, dtype=BF)], [0, 0, 8]), "not on the input's device")):
        with pytest.raises(ops.Unsupported, match=match):
            kf8.fp8_site_sm90(x, wq, sw, None, [32, 32], True, 1e-8, 0, *args)


@pytest.mark.parametrize("m", [1, 7, 64])
def test_fp8_site_lora_tail_math(m, gen):
    """rtlynx.ops.fp8.add_tail (the tail the FP8 site op adds in place after its GEMMs) against the float64
    formula y_i + (x A^T)[:, c0:c1] B_t^T, two members, overlapping and disjoint column ranges."""
    from rtlynx.ops import fp8 as kf8

    k, r, splits = 96, 24, [40, 16]
    x = torch.randn(m, k, generator=gen).to(BF)
    a = (torch.randn(r, k, generator=gen) * 0.1).to(BF)
    terms = [0, 0, 8, 1, 4, 20, 0, 8, 24]
    bs = [(torch.randn(splits[i], c1 - c0, generator=gen) * 0.1).to(BF)
          for i, c0, c1 in zip(terms[::3], terms[1::3], terms[2::3])]
    ys = [torch.randn(m, n, generator=gen).to(BF) for n in splits]
    want = [y.double().clone() for y in ys]
    h = x.double() @ a.double().t()
    for t, b in enumerate(bs):
        i, c0, c1 = terms[3 * t: 3 * t + 3]
        want[i] += h[:, c0:c1] @ b.double().t()
    kf8.add_tail(ys, x, a, bs, terms)
    for got, w in zip(ys, want):
        torch.testing.assert_close(got.double(), w, rtol=2e-2, atol=2e-2)  # h rounds to bf16, then y once
    before = [y.clone() for y in ys]
    kf8.add_tail(ys, x, None, [], [])  # no tail: untouched
    assert all(torch.equal(p, q) for p, q in zip(before, ys))


def test_fp8_site_with_tail_compiles_to_one_op_call(monkeypatch):
    """Under torch.compile (fullgraph) the FP8 site op with its LoRA tail is one opaque call whose outputs need no
    copy: the generated code calls it once and has no addmm or copy_ of its outputs (an in-place addmm_ on the op's
    outputs in traced code becomes an out-of-place addmm, which copies every output first: 8 ms of memcpy per
    FLUX.1-dev forward in the H100 profile of f82c915). A scoped CPU implementation stands in
    for the CUDA kernels (any function of the operands: only the graph is under test), and the operand checks,
    which want CUDA tensors, are off (tested above)."""
    from torch._inductor.utils import run_and_get_code

    from rtlynx.ops import fp8 as kf8

    def cpu_impl(x, wq, sw, bias, splits, norm, eps, act=0, lora_a=None, lora_b=None, lora_terms=()):
        w = wq.float() * sw[:, None]
        outs = [(x.float() @ w[o: o + n, : x.shape[1]].t()).to(BF) for o, n in zip([0, splits[0]], splits)]
        kf8.add_tail(outs, x, lora_a, list(lora_b or ()), list(lora_terms))
        return outs

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 256, generator=g).to(BF)
    wq = (torch.randn(64, 256, generator=g) * 0.1).to(F8)
    sw = torch.rand(64, generator=g) + 0.5
    a, b = (torch.randn(8, 256, generator=g) * 0.1).to(BF), (torch.randn(32, 8, generator=g) * 0.1).to(BF)

    def f(x):
        ys = ops.fp8_site(x, wq, sw, None, [32, 32], check=False, lora_a=a, lora_b=[b, b], lora_terms=[0, 0, 8, 1, 0, 8])
        return ys[0] * 2, ys[1] + 1

    monkeypatch.setattr(_checks, "check_fp8_site", lambda *args, **kwargs: None)
    with torch.library._scoped_library("rtlynx", "IMPL") as lib:
        lib.impl("fp8_site_sm90", cpu_impl, "CPU")
        eager = f(x)
        torch._dynamo.reset()
        got, code = run_and_get_code(torch.compile(f, fullgraph=True), x)
    torch._dynamo.reset()
    for p, q in zip(got, eager):
        torch.testing.assert_close(p, q)
    src = "\n".join(code)
    # the old way left `extern_kernels.addmm(y, h, B^T, beta=1, out=new)` here: aten copies y into `new` first
    assert src.count("= torch.ops.rtlynx.fp8_site_sm90.default(") == 1, src
    assert "addmm" not in src and "copy_" not in src, src


def test_centred_site_operands_are_checked():
    """Token-mean centring in the site ops (their fakes, meta tensors): M + R output rows, and each malformed
    centring operand refused in one line, bf16 and FP8 alike."""
    from rtlynx.ops import fp8 as kf8

    x, w = meta(6, 256), meta(64, 256)
    c, rows = meta(2, 256, dtype=torch.float32), meta(4, 256)
    outs = k90.sparse_site_sm90(x, w, None, None, [32, 32], True, 1e-8, c, rows)
    assert [t.shape for t in outs] == [(10, 32), (10, 32)]
    wq, sw = meta(64, 256, dtype=F8), meta(64, dtype=torch.float32)
    outs = kf8.fp8_site_sm90(x, wq, sw, None, [64], True, 1e-8, 0, None, None, [], c, meta(8, 256))
    assert [t.shape for t in outs] == [(14, 64)]
    for args, match in (
            ((c, None), "both centre and centre_rows"),
            ((None, rows), "both centre and centre_rows"),
            ((meta(2, 256), rows), "centre .* must be float32"),
            ((meta(4, 256, dtype=torch.float32), rows), r"B dividing M=6"),
            ((meta(2, 128, dtype=torch.float32), rows), r"\[B, K=256\]"),
            ((meta(2, 258, dtype=torch.float32)[:, :256], rows), "multiple of 4"),
            ((c, meta(4, 128)), r"\[R, K=256\]"),
            ((c, meta(4, 256, dtype=torch.float16)), "centre_rows .* must be bfloat16"),
            ((c, meta(4, 260)[:, :256]), "multiple of 8"),
            ((meta(1, 256, dtype=torch.float32).expand(2, 256), rows), "row stride >= K"),  # one row read twice
            ((c, meta(1, 256).expand(4, 256)), "row stride >= K"),
            ((torch.empty(2, 256), rows), "not on the input's device")):
        with pytest.raises(ops.Unsupported, match=match):
            k90.sparse_site_sm90(x, w, None, None, [32, 32], True, 1e-8, *args)
        with pytest.raises(ops.Unsupported, match=match):
            kf8.fp8_site_sm90(x, wq, sw, None, [64], True, 1e-8, 0, None, None, [], *args)
    # no token rows (the kernels would return none, the fakes M + R), and the FP8 op's GELU producer, which the
    # centring prune does not have: refused by the ops and their fakes alike
    with pytest.raises(ops.Unsupported, match="at least one token row"):
        k90.sparse_site_sm90(meta(0, 256), w, None, None, [32, 32], True, 1e-8, c, rows)
    with pytest.raises(ops.Unsupported, match="at least one token row"):
        kf8.fp8_site_sm90(meta(0, 256), wq, sw, None, [64], True, 1e-8, 0, None, None, [], c, meta(8, 256))
    with pytest.raises(ops.Unsupported, match="no GELU producer"):
        kf8.fp8_site_sm90(x, wq, sw, None, [64], True, 1e-8, 1, None, None, [], c, meta(8, 256))


def test_gemm_tables_serve_a_few_extra_rows():
    """A centred site's GEMM has its tokens plus a few centre rows a sample: the measured config of the token count
    serves it (bf16: with and without the LoRA tail's 128 columns; FP8 alike)."""
    from rtlynx.ops import fp8 as kf8

    for (m, n, k), (name, sched) in k90.CONFIG_TABLE.items():
        if m >= 64 and not any(key[1:] == (n, k) and m < key[0] <= m + 8 for key in k90.CONFIG_TABLE):
            want = (k90.CONFIG_NAMES.index(name), sched)
            assert k90.choose_config(m + 8, n, k) == want and k90.choose_config(m + 8, n, k + 128) == want, (m, n, k)
    for (m, n, kg), (name, sched) in kf8.CONFIG_TABLE.items():
        assert kf8.choose_config(m + 4, n, kg) == (kf8.CONFIG_NAMES.index(name), sched)
