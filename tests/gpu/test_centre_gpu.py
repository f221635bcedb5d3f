"""Token-mean centring (SparsityConfig.centre) on the lynx kernels: every site of the tiny models against the fp32
centred spec on the inputs it really sees, and the same outputs under torch.compile(fullgraph=True)."""

import pytest
import torch

import rtlynx
from rtlynx import api, sites

from .test_sites_gpu import gen  # noqa: F401  (the fixture: a CUDA generator, its seed printed)
from .test_sm90_kernels import rel_err, rnd

diffusers = pytest.importorskip("diffusers")
from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer  # noqa: E402


@pytest.mark.parametrize("kind", ["flux", "qwen-image", "z-image"])
def test_centred_sites_match_the_spec(kind, gen):
    model = tiny_transformer(kind).cuda().to(torch.bfloat16)
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, lora_rank=8, speed_rules=False, centre="token_mean")
    with torch.no_grad():
        for l in api.sparse_layers(model).values():
            l.lora_B.copy_(rnd(l.lora_B.shape, torch.bfloat16, gen, scale=0.05))
    errs = sites.verify(model, **inputs)
    assert len(errs) == len(sites.model_sites(model)) and max(errs.values()) < 1e-2, errs


@pytest.mark.parametrize("kind", ["flux", "z-image"])
def test_fp8_centred_sites_match_the_spec(kind, gen):
    """dtype="fp8" + centring on the FP8 site kernels against the FP8 centred spec (rtlynx.reference.fp8 with
    ``centre``: c's four FP8 rows in the site GEMM); the sites the kernels run store FP8 weights only, as uncentred
    ones do."""
    model = tiny_transformer(kind).cuda().to(torch.bfloat16)
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, lora_rank=8, speed_rules=False, centre="token_mean", dtype="fp8")
    with torch.no_grad():
        for l in api.sparse_layers(model).values():
            l.lora_B.copy_(rnd(l.lora_B.shape, torch.bfloat16, gen, scale=0.05))
    # stored exactly where the site kernels can run: K and N multiples of 8 (the tiny Z-Image's feed-forward has 170)
    assert all(s._fp8_stored == (s.k % 8 == 0 and s.n % 8 == 0) for s in sites.model_sites(model))
    assert any(s._fp8_stored for s in sites.model_sites(model))
    errs = sites.verify(model, **inputs)
    assert len(errs) == len(sites.model_sites(model)) and max(errs.values()) < 2e-2, errs


def test_centred_compiles_fullgraph(gen):
    model = tiny_transformer("flux").cuda().to(torch.bfloat16)
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, lora_rank=8, speed_rules=False, centre="token_mean")
    with torch.no_grad():
        eager = output_tensor(model(**inputs)).clone()
        compiled = output_tensor(torch.compile(model, fullgraph=True)(**inputs))
    assert torch.isfinite(compiled).all() and rel_err(compiled, eager) < 2e-2


# ------------------------------------------------------------------------ the centring prune kernels, raw, bitwise
def _centre_case(b, t, k, gen, rows_per_sample, dtype=torch.bfloat16, big=False):
    x = rnd((b * t, k), dtype, gen) + rnd((1, k), dtype, gen, scale=3.0)  # a shared offset
    if big and b * t > 3:  # |x - c| ~ 1e20: float32 squares overflow, the prunes' rescale pass runs (bf16 only)
        x[3] = x[3] * 1e20
    c = x.float().reshape(b, t, k).mean(1)  # float32 [B, K], as reference.token_mean
    crows = rnd((rows_per_sample * b, k), dtype, gen)
    return x, c, crows


@pytest.mark.parametrize("dtype,r,big", [(torch.bfloat16, 0, False), (torch.bfloat16, 64, False),
                                         (torch.float16, 64, False), (torch.bfloat16, 0, True)])
@pytest.mark.parametrize("b,t,k", [(1, 1, 64), (2, 7, 200), (3, 33, 3072), (2, 2048, 3072), (1, 4096, 15360)])
def test_centred_prune_is_the_twin_bit_for_bit(b, t, k, dtype, r, big, gen):
    """rtlynx_prune_compress_centred_sm90 against rtlynx.reference.sm90.compress_sm90 of centred_operand: values
    and metadata bit for bit (outputs poisoned first), the norm scale to float32 summation order; with a LoRA tail
    (r columns of h for the M + R rows: reference.sm90.lora_tail) and with rows whose squares overflow float32."""
    from rtlynx.reference import sm90 as ref90
    from rtlynx.reference.sm90 import padded_shape

    from rtlynx.ops import _launch, sm90 as k90

    x, c, crows = _centre_case(b, t, k, gen, 2, dtype, big)
    m, rr = x.shape[0], crows.shape[0]
    mp, kp = padded_shape(m + rr, k)
    kg = kp + 2 * r
    h = rnd((m + rr, r), dtype, gen) if r else None
    values = torch.full((m + rr, kg // 2), -1, dtype=torch.int16, device="cuda")
    meta = torch.full((mp * kg // 8,), 0xAB, dtype=torch.uint8, device="cuda")
    scale = torch.full((m + rr,), float("nan"), device="cuda")
    L = k90.centred_library()
    rc = L.rtlynx_prune_compress_centred_sm90(
        1 if dtype == torch.float16 else 0, x.data_ptr(), x.stride(0), m, k, c.data_ptr(), c.stride(0), t,
        crows.data_ptr(), crows.stride(0), rr, None if h is None else h.data_ptr(), 0 if h is None else h.stride(0),
        r, values.data_ptr(), values.stride(0), meta.data_ptr(), scale.data_ptr(), 1, 1e-8, _launch.stream())
    assert rc == 0
    torch.cuda.synchronize()
    rv, rmeta, rscale = ref90.compress_sm90(ref90.centred_operand(x, c, crows))
    assert torch.equal(values[:, : kp // 2], rv.view(torch.int16)), "values differ"
    torch.testing.assert_close(scale, rscale, rtol=3e-5, atol=0)
    rows = ref90.sm90_meta_to_rows(meta, m + rr, kg)
    assert torch.equal(rows[:, : kp // 8], ref90.sm90_meta_to_rows(rmeta, m + rr, kp)), "metadata differs"
    if r:
        tail = ref90.lora_tail(h, scale)  # h / s with the kernel's s (its float32 order)
        assert torch.equal(values[:, kp // 2:], tail.view(torch.int16)), "LoRA tail differs"
        assert bool((rows[:, kp // 8:] == ref90.TAIL_META_BYTE).all())


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("b,t,k", [(1, 1, 64), (2, 7, 200), (3, 33, 3072), (1, 4096, 15360)])
def test_centred_fp8_prune_is_the_twin_bit_for_bit(b, t, k, big, gen):
    """rtlynx_prune_quant_fp8_centred_sm90 against rtlynx.reference.fp8.compress_sm90_fp8 of centred_operand:
    e4m3 values and metadata bit for bit, the row scales to float32 order; ``big``: rows whose squares overflow
    float32 (the rescale pass)."""
    from rtlynx.reference import fp8 as rf8, sm90 as ref90
    from rtlynx.reference.sm90 import padded_shape

    from rtlynx.ops import _launch, fp8 as kf8, sm90 as k90

    x, c, crows = _centre_case(b, t, k, gen, 4, big=big)
    m, r = x.shape[0], crows.shape[0]
    mp, kp = padded_shape(m + r, k)
    values = torch.full((m + r, kp // 2), 0x7E, dtype=torch.uint8, device="cuda")
    meta = torch.full((mp * kp // 8,), 0xAB, dtype=torch.uint8, device="cuda")
    rs, sx, s = (torch.full((m + r,), float("nan"), device="cuda") for _ in range(3))
    kf8._library()  # declares the FP8 entry points
    L = k90.centred_library(fp8=True)
    rc = L.rtlynx_prune_quant_fp8_centred_sm90(0, x.data_ptr(), x.stride(0), m, k, c.data_ptr(), c.stride(0), t,
                                               crows.data_ptr(), crows.stride(0), r, values.data_ptr(),
                                               values.stride(0), meta.data_ptr(), rs.data_ptr(), sx.data_ptr(),
                                               s.data_ptr(), 1, 1e-8, _launch.stream())
    assert rc == 0
    torch.cuda.synchronize()
    want = rf8.compress_sm90_fp8(ref90.centred_operand(x, c, crows))
    assert torch.equal(values, want[0].view(torch.uint8)), "values differ"
    assert torch.equal(meta, want[1]), "metadata differs"
    for got, ref in zip((rs, sx, s), want[2:]):
        torch.testing.assert_close(got, ref, rtol=3e-5, atol=0)


def test_centred_sites_prune_in_the_kernel(gen):
    """On a library with the centring prune, a centred site calls it (x - c is never written) and its outputs still
    match the spec (test_centred_sites_match_the_spec covers every model)."""
    model = tiny_transformer("flux").cuda().to(torch.bfloat16)
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, lora_rank=8, speed_rules=False, centre="token_mean")
    calls = []
    real = rtlynx.reference.centred

    def counting(x, c):
        calls.append(x.shape)
        return real(x, c)

    rtlynx.reference.centred = counting
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        rtlynx.reference.centred = real
    assert rtlynx.ops.centre_in_kernels("native") and calls == []


def test_site_ops_with_a_centre_pass_opcheck(gen):
    """torch.library.opcheck of both site ops with centre / centre_rows (the fakes' M + R rows against the kernels)."""
    from rtlynx.ops import fp8 as kf8, sm90 as k90
    from rtlynx.reference import centre_rows
    from rtlynx.reference.fp8 import fp8_centre_rows

    x = rnd((2 * 35, 256), torch.bfloat16, gen) + 2.0
    c = x.float().reshape(2, 35, 256).mean(1)
    w = rnd((96, 256), torch.bfloat16, gen)
    torch.library.opcheck(k90.sparse_site_sm90, (x, w, None, None, [64, 32], True, 1e-8, c, centre_rows(c, x.dtype)))
    wq, sw = kf8.quantize_weight(w)
    no_schema = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")  # as test_fp8_kernels
    torch.library.opcheck(kf8.fp8_site_sm90, (x, wq, sw, None, [64, 32], True, 1e-8, 0, None, None, [], c,
                                              fp8_centre_rows(c, x.dtype)), test_utils=no_schema)
