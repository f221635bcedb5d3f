"""FP8 weight storage (dtype="fp8", keep_dense_weights=False): the site's FP8 operand replaces the bf16 weights.

On the GPU a site stores its weights in FP8 when its calls run on the FP8 kernels (tests/gpu/test_fp8_kernels.py);
here the same storage is made by hand on the CPU (Site.fp8_operand + _store_fp8) and every path that reads the
weights afterwards is compared with an independent computation from the original weights: the FP8 spec
(rtlynx.reference.fp8 on the original bf16 weights quantises them to exactly the stored values), and the
dequantised weight q * s computed here from quantize_rows_e4m3 of the originals."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rtlynx
from rtlynx import api, sites
from rtlynx.reference.fp8 import fp8_sparse_act_linear, quantize_rows_e4m3

FP8 = torch.float8_e4m3fn


class Attn(nn.Module):
    """Q/K/V read one input (one site of three layers), then an output projection (a site of its own)."""

    def __init__(self, d=64, bias=True):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.to_out = nn.Linear(d, d + 16, bias=bias)

    def forward(self, x):
        return self.to_out(self.to_q(x) * self.to_k(x) + self.to_v(x))


def build(gen, lora=0, bias=True):
    model = Attn(bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    rtlynx.sparsify(model, preset=None, include=["to_*"], dtype="fp8", lora_rank=lora, speed_rules=False)
    if lora:
        with torch.no_grad():
            for layer in api.sparse_layers(model).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    return model, originals


def store(model):
    """What a site on the FP8 kernels does at sparsify (Site._prepare_fp8), made by hand on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for site in sites.model_sites(model):
            site.fp8_operand()
            site._store_fp8()


def dequantised(w):
    q, s = quantize_rows_e4m3(w)
    return (q.float() * s.unsqueeze(1)).to(w.dtype)


@pytest.mark.parametrize("lora", [0, 8])
def test_stored_weights_are_the_quantised_originals_and_outputs_unchanged(lora, gen):
    model, originals = build(gen, lora)
    x = torch.randn(5, 7, 64, generator=gen).to(torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = model(x)
        store(model)
        after = model(x)
    layers = api.sparse_layers(model)
    for name, layer in layers.items():
        q, s = quantize_rows_e4m3(originals[name])
        assert layer.weight.dtype == FP8 and layer.compute_dtype == torch.bfloat16
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(layer.weight_scale, s)
    assert all(s._fp8_stored and s.wext is None for s in sites.model_sites(model))
    summ = api.summary(model)
    assert summ.fp8_stored == 4 and "4 sparse layers hold their weights in FP8 only" in str(summ)
    assert torch.equal(before, after)  # the FP8 spec quantises the originals to exactly what is stored
    # and both equal the spec evaluated here on the original weights
    with torch.no_grad():
        xin = x.reshape(-1, 64)
        ql = layers["to_q"]
        a, b = (ql.lora_A, ql.lora_B) if lora else (None, None)
        want_q = fp8_sparse_act_linear(xin, originals["to_q"], ql.bias, lora_a=a, lora_b=b)
        assert torch.equal(ql(x).reshape(-1, 64), want_q)


def test_no_bf16_weight_copy_left(gen):
    model, originals = build(gen)
    store(model)
    dense_bytes = sum(w.numel() * 2 for w in originals.values())
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    held = sum(storages.values())
    # exactly the FP8 operands (K padded to 128, 1 byte), their float32 scales and the bf16 biases: no bf16 weight
    want = sum(s.n * s.kp + 4 * s.n + 2 * s.n for s in sites.model_sites(model))
    assert held == want, (held, want, dense_bytes)
    assert all(t.dtype != torch.bfloat16 or t.dim() == 1 for t in model.parameters())


def test_dense_mode_schedule_and_unsparsify_dequantise(gen):
    model, originals = build(gen)
    x = torch.randn(9, 64, generator=gen).to(torch.bfloat16)
    store(model)
    layers = api.sparse_layers(model)
    with torch.no_grad(), api.dense_mode(model):
        got = layers["to_k"](x)
    want = F.linear(x, dequantised(originals["to_k"]), layers["to_k"].bias)
    assert torch.equal(got, want)
    with pytest.warns(RuntimeWarning, match="dequantis"):
        rtlynx.unsparsify(model)
    for name, lin in ((n, model.get_submodule(n)) for n in originals):
        assert type(lin) is nn.Linear and lin.weight.dtype == torch.bfloat16 and lin.weight.requires_grad
        assert torch.equal(lin.weight, dequantised(originals[name]))


def test_configure_native_restores_dequantised_weights(gen):
    model, originals = build(gen)
    x = torch.randn(6, 64, generator=gen).to(torch.bfloat16)
    store(model)
    with pytest.warns(RuntimeWarning, match="dequantis"):
        rtlynx.configure(model, dtype="native")
    layer = api.sparse_layers(model)["to_v"]
    assert layer.weight.dtype == torch.bfloat16 and layer.weight_scale is None
    assert not any(s._fp8_stored for s in sites.model_sites(model))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = layer(x)
    want = rtlynx.reference.sparse_act_linear(x, dequantised(originals["to_v"]), layer.bias, 2, 4, "norm")
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_dtype_cast_folds_the_scales(gen):
    model, originals = build(gen)
    store(model)
    with pytest.warns(RuntimeWarning, match="dtype cast"):
        model.float()
    for name, layer in api.sparse_layers(model).items():
        q, s = quantize_rows_e4m3(originals[name])
        assert layer.weight.dtype == torch.float32 and layer.weight_scale is None
        assert torch.equal(layer.weight, q.float() * s.unsqueeze(1))
    x = torch.randn(4, 64, generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(model(x)).all()


def test_device_move_keeps_fp8_storage_and_state_dict(gen):
    model, _ = build(gen, lora=4)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store(model)
        before = model(x)
        model.to("cpu")  # every member goes through _apply: the site rebuilds from the FP8 weights
        after = model(x)
    assert all(s._fp8_stored for s in sites.model_sites(model))
    assert torch.equal(before, after)
    sd = model.state_dict()
    assert sd["to_q.weight"].dtype == FP8 and sd["to_q.weight_scale"].dtype == torch.float32


def test_keep_dense_weights_is_a_config_field(tmp_path, gen):
    model, _ = build(gen, lora=4)
    rtlynx.configure(model, dtype="fp8")
    cfg = api.config_of(model)
    assert cfg.keep_dense_weights is False
    rtlynx.save(model, tmp_path / "lynx")
    fresh = Attn().to(torch.bfloat16)
    rtlynx.load(fresh, tmp_path / "lynx")
    assert api.config_of(fresh).keep_dense_weights is False and api.config_of(fresh).dtype == "fp8"
    with pytest.raises(ValueError, match="keep_dense_weights"):
        rtlynx.SparsityConfig(keep_dense_weights="yes")


def test_load_and_configure_take_keep_dense_weights(tmp_path, gen):
    """An exact dense baseline next to FP8 sites (rtlynx generate --compare, the quality benchmark): the flag can
    be set when loading a save made with dtype="fp8", and through configure."""
    model, _ = build(gen, lora=4)
    rtlynx.save(model, tmp_path / "lynx")
    fresh = Attn().to(torch.bfloat16)
    rtlynx.load(fresh, tmp_path / "lynx", keep_dense_weights=True)
    assert api.config_of(fresh).keep_dense_weights and api.config_of(fresh).dtype == "fp8"
    with pytest.raises(ValueError, match="keep_dense_weights must be a bool"):
        rtlynx.load(Attn().to(torch.bfloat16), tmp_path / "lynx", keep_dense_weights="no")
    rtlynx.configure(fresh, keep_dense_weights=False)
    assert api.config_of(fresh).keep_dense_weights is False


def test_dense_product_on_fp8_weights_warns(gen):
    model, _ = build(gen)
    store(model)
    with pytest.warns(RuntimeWarning, match="dequantised values"), torch.no_grad(), api.dense_mode(model):
        model(torch.randn(2, 64, generator=gen).to(torch.bfloat16))


def test_loading_bf16_base_weights_into_fp8_storage_quantises_them(gen):
    """load_state_dict of plain bf16 weights (a fine-tuned base) into FP8-stored layers: quantised like sparsify
    does (not cast to e4m3 without a scale); the output equals the FP8 spec on the new weights."""
    model, _ = build(gen)
    store(model)
    new = {n: (torch.randn(m.weight.shape, generator=gen) * 0.3).to(torch.bfloat16)
           for n, m in api.sparse_layers(model).items()}
    model.load_state_dict({f"{n}.weight": w for n, w in new.items()}, strict=False)
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    for name, layer in api.sparse_layers(model).items():
        q, s = quantize_rows_e4m3(new[name])
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(layer.weight_scale, s)
    layer = api.sparse_layers(model)["to_k"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(layer(x), fp8_sparse_act_linear(x, new["to_k"], layer.bias))
