"""The FP8 (e4m3) specification (rtlynx.reference.fp8) and dtype="fp8" through the API, on the CPU."""

import pytest
import torch

import rtlynx
from conftest import load_benchmark
from rtlynx import reference
from rtlynx.reference import fp8

SEED = 8_2026


@pytest.fixture
def gen(request):
    seed = SEED + sum(map(ord, request.node.name))
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def test_row_quantisation_error_bound_and_exact_max(gen):
    x = torch.randn(37, 96, generator=gen) * torch.logspace(-2, 2, 37).unsqueeze(1)
    q, s = fp8.quantize_rows_e4m3(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (37,)
    back = fp8.dequantize(q, s)
    # e4m3: 3 mantissa bits -> half a step is 2^-4 relative for normals; subnormals (|v| < 2^-6) step 2^-9 absolute
    err = (back - x).abs()
    bound = torch.maximum(x.abs() * 2.0 ** -4, s.unsqueeze(1) * 2.0 ** -10)
    assert bool((err <= bound * (1 + 1e-6)).all())
    # the largest |x| of each row maps to 448 exactly
    torch.testing.assert_close(back.abs().amax(1), x.abs().amax(1), rtol=1e-6, atol=0)


def test_row_scale_is_the_correctly_rounded_quotient(gen):
    """sx = absmax / 448 rounded once (the kernels' __fdiv_rn), not absmax * fl(1/448): float64 division of float32
    operands rounded to float32 is correctly rounded, the independent value."""
    x = (torch.randn(4096, 32, generator=gen) * 7).to(torch.bfloat16)
    _, s = fp8.quantize_rows_e4m3(x)
    want = (x.float().abs().amax(1).double() / 448.0).float()
    assert torch.equal(s, want)
    assert not torch.equal(want, (x.float().abs().amax(1) * (1 / 448.0))), "the reciprocal product differs somewhere"


def test_zero_rows_and_nan_rows():
    x = torch.zeros(3, 8)
    x[1, 2] = float("nan")
    x[2, 5] = 3.0
    q, s = fp8.quantize_rows_e4m3(x)
    assert s[0] == 0 and bool((q[0].float() == 0).all())          # no NaN from 0 / 0
    assert torch.isnan(fp8.dequantize(q, s)[1]).any()               # NaN propagates to its token
    assert fp8.dequantize(q, s)[2, 5] == 3.0


def test_exactly_representable_inputs_give_the_native_result(gen):
    """Values on the e4m3 grid with row absmax 448 (scales 1) quantise exactly: FP8 == the fp32 native spec."""
    grid = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)]
    pick = lambda *shape: grid[torch.randint(0, len(grid), shape, generator=gen)]  # noqa: E731
    x, w = pick(9, 64), pick(24, 64)
    x[:, 0], w[:, 0] = 448.0, 448.0  # each row's absmax is 448 and survives the 2:4 pruning
    y = fp8.fp8_sparse_act_linear(x, w, None, compensation="none")
    want = reference.sparse_act_linear(x.double(), w.double(), compensation="none").float()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-3)  # fp32 sums vs fp64


def test_fp8_close_to_native_and_keeps_the_pruning(gen):
    x = torch.randn(50, 256, generator=gen)
    w = torch.randn(80, 256, generator=gen) / 16
    b = torch.randn(80, generator=gen)
    a, bb = torch.randn(8, 256, generator=gen) / 16, torch.randn(80, 8, generator=gen) / 8
    y8 = fp8.fp8_sparse_act_linear(x, w, b, lora_a=a, lora_b=bb)
    y = reference.sparse_act_linear(x, w, b, lora_a=a, lora_b=bb)
    rel = float((y8 - y).norm() / y.norm())
    assert 1e-4 < rel < 0.05  # quantisation error is there, and small
    qx, sx = fp8.prune_quantize_e4m3(x)
    assert torch.equal(qx.float() != 0, reference.prune_nm(x) != 0)  # zeros exactly where the pruning put them


def test_dtype_fp8_through_sparsify_configure_save_load(tmp_path):
    pytest.importorskip("diffusers")
    from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer

    model = tiny_transformer("flux")
    inputs = example_inputs(model)
    rtlynx.sparsify(model)
    with torch.no_grad():
        native = output_tensor(model(**inputs))
        rtlynx.configure(model, dtype="fp8")
        seen = {}
        hooks = [layer.register_forward_hook(lambda mod, inp, o, n=n: seen.update({n: (mod, inp[0], o)}))
                 for n, layer in rtlynx.sparse_layers(model).items()]
        out = output_tensor(model(**inputs))
        for h in hooks:
            h.remove()
    # every sparse layer ran the FP8 specification on the input it saw (not the native path)
    assert len(seen) == len(rtlynx.sparse_layers(model))
    for name, (layer, x, y) in seen.items():
        expect = fp8.fp8_sparse_act_linear(x, layer.weight, layer.bias, layer.n, layer.m, layer.compensation,
                                           eps=layer.eps)
        torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.isfinite(out).all()
    assert float((out - native).norm() / native.norm()) < 0.1
    assert "FP8 e4m3" in str(rtlynx.summary(model))
    rtlynx.save(model, tmp_path / "s")
    fresh = tiny_transformer("flux")
    rtlynx.load(fresh, tmp_path / "s")
    assert rtlynx.config_of(fresh).dtype == "fp8"
    with torch.no_grad():
        assert torch.equal(output_tensor(fresh(**inputs)), out)
    with pytest.raises(ValueError, match="dtype"):
        rtlynx.configure(model, dtype="fp4")


# ---------------------------------------------------------------------------------------- sm90 8-bit layout
def _brute_meta_8bit(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit sm90 metadata by loops over groups: CUTLASS's TensorEAtom_8bit (row-major 64 x 128 logical atom,
    atoms M-first) applied to each group's 2-bit indices, nibble = idx0 | idx1 << 2, low nibble first."""
    m, k = x.shape
    mp, kp = (m + 63) // 64 * 64, (k + 127) // 128 * 128
    xp = torch.zeros(mp, kp, dtype=x.dtype)
    xp[:m, :k] = x
    out = torch.zeros(mp * kp // 8, dtype=torch.uint8)
    mask = reference.nm_mask(xp, 2, 4)
    for r in range(mp):
        for g in range(kp // 4):
            idx = [i for i in range(4) if mask[r, 4 * g + i]]
            nib = idx[0] | idx[1] << 2
            col = 4 * g  # logical element of the group
            atom = (r // 64) * 64 * 128 + (col // 128) * mp * 128  # atoms along M first, then K
            elem = atom + (r % 64) * 128 + col % 128  # row-major inside the atom
            out[elem // 8] |= nib << (4 * ((elem % 8) // 4))
    return out


@pytest.mark.parametrize("m,k", [(1, 8), (3, 136), (65, 256), (70, 200)])
def test_sm90_fp8_metadata_matches_brute_force_layout(m, k, gen):
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    values, meta, rs, sx, s = fp8.compress_sm90_fp8(x)
    assert torch.equal(meta, _brute_meta_8bit(x))
    assert values.dtype == torch.float8_e4m3fn and values.shape == (m, (k + 127) // 128 * 64)
    rows = fp8.sm90_8bit_meta_to_rows(meta, m, k)
    assert torch.equal(fp8.rows_meta_to_sm90_8bit(rows), meta)


def test_sm90_fp8_round_trip_equals_spec(gen):
    x = torch.randn(70, 200, generator=gen).to(torch.bfloat16) * 3
    values, meta, rs, sx, s = fp8.compress_sm90_fp8(x)
    q, sx_ref = fp8.prune_quantize_e4m3(x)  # the high-level spec: prune, then quantise the dense-with-zeros rows
    assert torch.equal(fp8.decompress_sm90_fp8(values, meta, 200), q.float())
    assert torch.equal(sx, sx_ref)
    torch.testing.assert_close(rs, s * sx_ref)
    torch.testing.assert_close(s, reference.norm_scale(x))


def test_sm90_fp8_gemm_reference_equals_the_linear_spec(gen):
    x = torch.randn(70, 200, generator=gen).to(torch.bfloat16)
    w = (torch.randn(24, 200, generator=gen) * 0.05).to(torch.bfloat16)
    b = torch.randn(24, generator=gen).to(torch.bfloat16)
    values, meta, rs, _, _ = fp8.compress_sm90_fp8(x)
    wq, sw = fp8.quantize_weight_e4m3(w)
    assert wq.shape == (24, 256) and bool((wq[:, 200:].float() == 0).all())
    y = fp8.sparse_gemm_fp8(values, meta, wq, rs, sw, b)
    # independent: dense fp32 product of the dequantised operands
    xq, sxq = fp8.prune_quantize_e4m3(x)
    wqd, swd = fp8.quantize_rows_e4m3(w)
    want = (xq.float() * sxq[:, None]) @ (wqd.float() * swd[:, None]).T * reference.norm_scale(x)[:, None] + b.float()
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)


def test_sm90_fp8_gelu_producer_reference(gen):
    h = torch.randn(9, 136, generator=gen).to(torch.bfloat16)
    got = fp8.compress_sm90_fp8(h, act="gelu_tanh")
    want = fp8.compress_sm90_fp8(torch.nn.functional.gelu(h.float(), approximate="tanh").to(torch.bfloat16))
    assert all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b) for a, b in zip(got, want))


def test_fp8_op_fakes_give_the_documented_shapes():
    from rtlynx.ops import fp8 as kf8

    x = torch.empty(70, 200, dtype=torch.bfloat16, device="meta")
    v, meta, rs, sx, s = kf8.prune_quant_fp8_sm90(x, True, 1e-8)
    assert v.shape == (70, 128) and v.dtype == torch.float8_e4m3fn and meta.shape == (128 * 256 // 8,)
    wq = torch.empty(48, 256, dtype=torch.float8_e4m3fn, device="meta")
    sw = torch.empty(48, device="meta")
    y = kf8.sparse_gemm_fp8_sm90(v, meta, wq, rs, sw, None)
    assert y.shape == (70, 48) and y.dtype == torch.bfloat16
    outs = kf8.fp8_site_sm90(x, wq, sw, None, [32, 16], True, 1e-8)
    assert [tuple(o.shape) for o in outs] == [(70, 32), (70, 16)]


def test_quality_fp8_variants_and_their_sheet(tmp_path):
    """benchmarks/quality.py's FP8 variants: dense FP8 = each sparse layer's dense product on e4m3 operands (checked
    against the spec's quantisers on one layer), weights restored afterwards; the sheet labels variants outside
    demo.VARIANTS (it raised KeyError)."""
    from pathlib import Path

    from rtlynx import demo
    from rtlynx.integrations.diffusers import tiny_transformer

    quality = load_benchmark("quality")
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, mode="dense")
    name, layer = next(iter(rtlynx.sparse_layers(model).items()))
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), quality._DenseFP8(model):
        got = layer(x)
    want = fp8.dequantize(*fp8.quantize_rows_e4m3(x)) @ fp8.dequantize(*fp8.quantize_rows_e4m3(w0)).T + layer.bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, w0)
    imgs = {v: (torch.randint(0, 255, (2, 16, 16, 3), dtype=torch.uint8), 0.0) for v in ("dense", "rtlynx_fp8")}
    out = demo.sheet(imgs, ["a", "b"], tmp_path / "s.png", labels={"rtlynx_fp8": "RT-Lynx FP8"})
    assert Path(out).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_centre_rows_carry_the_centre_through_e4m3(dtype, gen):
    """rtlynx.reference.fp8.fp8_centre_rows: four rows a sample, each already 2:4 (pruning keeps them whole), the
    first pair summing to c, the second to what e4m3 takes off the first; their FP8 products (per-row e4m3, as the
    site quantises a token) give c Q(W)^T to well under the e4m3 step, where the first pair alone is off by about
    the step itself. Checked in float64 against c Q(W)^T."""
    b, k, n = 3, 256, 64
    c = torch.randn(b, 1, k, generator=gen) * (1 + 3 * torch.rand(k, generator=gen))  # uneven channels, like a DiT
    rows = fp8.fp8_centre_rows(c, dtype)
    assert rows.shape == (4 * b, k) and rows.dtype == dtype
    assert torch.equal(reference.prune_nm(rows, 2, 4), rows)  # 2:4 already: the prune is the identity on them
    pairs = rows.double().reshape(2, 2, b, k).sum(1)  # [c; residual]
    assert torch.equal(pairs[0], c.reshape(b, k).to(dtype).double())
    lost = c.reshape(b, k).double() - fp8.dequantize(*fp8.quantize_rows_e4m3(rows[: 2 * b])).double().reshape(2, b, k).sum(0)
    torch.testing.assert_close(pairs[1], lost.to(dtype).double(), rtol=0, atol=0)
    w = torch.randn(n, k, generator=gen).to(dtype)
    wq = fp8.dequantize(*fp8.quantize_rows_e4m3(w)).double()
    want = c.reshape(b, k).double() @ wq.T

    def product(r):  # each row quantised per row (the kernel's scale), products exact, summed per sample
        return (fp8.dequantize(*fp8.quantize_rows_e4m3(r)).double() @ wq.T).reshape(-1, b, n).sum(0)

    err_four = float((product(rows) - want).norm() / want.norm())
    err_pair = float((product(rows[: 2 * b]) - want).norm() / want.norm())
    assert err_four < 2e-3 and err_pair > 4 * err_four, (err_four, err_pair)
