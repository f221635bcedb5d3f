"""sparsify / configure / summary / save / load on real diffusers transformers (tiny random configs)."""

import fnmatch

import pytest
import torch
import torch.nn as nn

import rtlynx
from conftest import brute_mask, brute_sparse_act_linear
from rtlynx.integrations.diffusers import TINY_CONFIGS, example_inputs, output_tensor, tiny_transformer

# The intended layer sets, written independently of rtlynx.presets.
PAPER_SUFFIXES = {
    "flux": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
             "single_transformer_blocks.*.proj_out"],
    "qwen-image": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                   "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"],
    "z-image": ["attention.to_q", "attention.to_k", "attention.to_v", "feed_forward.w1", "feed_forward.w2",
                "feed_forward.w3"],
}
# Text-stream layers, which the default presets keep dense (small M, most sensitive).
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "ff_context.", "txt_mlp.", "context_refiner.")


def linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def expected_paper(kind, model, text_stream=True):
    out = []
    for name in linears(model):
        if "." not in name:
            continue  # top-level embedders / heads
        if not text_stream and any(t in name for t in TEXT_STREAM):
            continue
        if any(fnmatch.fnmatchcase(name, "*" + s) if "*" in s else name.endswith(s) for s in PAPER_SUFFIXES[kind]):
            out.append(name)
    return out


@pytest.fixture(params=sorted(TINY_CONFIGS))
def kind(request):
    return request.param


@pytest.mark.parametrize("paper", [False, True])
def test_presets_replace_exactly_intended_layers(kind, paper):
    model = tiny_transformer(kind)
    want = expected_paper(kind, model, text_stream=paper)
    rtlynx.sparsify(model, preset=kind + "-paper" if paper else "auto")
    got = list(rtlynx.sparse_layers(model))
    assert sorted(got) == sorted(want) and got
    assert not any(n.endswith(("to_out.0", "to_add_out")) for n in got)  # attention outputs stay dense
    assert paper == any(t in n for n in got for t in TEXT_STREAM)  # the default keeps the text stream dense


@pytest.mark.parametrize("preset_suffix", ["", "-paper", "-all"])
def test_conditioning_layers_never_sparse_and_see_more_than_batch_rows(kind, preset_suffix):
    model = tiny_transformer(kind)
    rtlynx.sparsify(model, preset=kind + preset_suffix)
    sparse = rtlynx.sparse_layers(model)
    for name in sparse:
        assert not any(w in name for w in ("time", "adaLN", "_mod.", "embedder", "norm")), name
    rows = {}
    def record(name):
        def hook(mod, inp, out):
            rows[name] = inp[0].numel() // inp[0].shape[-1]
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in sparse.items()]
    output_tensor(model(**example_inputs(model, batch=2)))
    for h in hooks:
        h.remove()
    assert rows and all(r > 2 for r in rows.values())  # token-level, not M = batch


def test_dense_mode_reproduces_original_exactly(kind):
    model = tiny_transformer(kind)
    inputs = example_inputs(model, batch=2)
    with torch.no_grad():
        ref = output_tensor(model(**inputs)).clone()
        rtlynx.sparsify(model, lora_rank=4)
        for layer in rtlynx.sparse_layers(model).values():
            layer.lora_B.data.normal_()
        with rtlynx.dense_mode(model):
            assert torch.equal(output_tensor(model(**inputs)), ref)
        # every sparse layer, on the input it really sees, against the independent float64 reference
        seen = {}
        def record(name):
            def hook(mod, inp, out):
                seen.setdefault(name, (mod, inp[0], out))  # returns None: the output stays as it is
            return hook

        hooks = [layer.register_forward_hook(record(n)) for n, layer in rtlynx.sparse_layers(model).items()]
        output_tensor(model(**inputs))
        for h in hooks:
            h.remove()
        assert seen and len(seen) == len(rtlynx.sparse_layers(model))
        for name, (layer, x, y) in seen.items():
            expect = brute_sparse_act_linear(layer, x)
            torch.testing.assert_close(y.double(), expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max()),
                                       msg=lambda m, name=name: f"{name}: {m}")
        rtlynx.configure(model, mode="dense")
        assert torch.equal(output_tensor(model(**inputs)), ref)
        rtlynx.unsparsify(model)
        assert not rtlynx.sparse_layers(model)
        assert torch.equal(output_tensor(model(**inputs)), ref)


def test_sparse_output_equals_independent_per_layer_computation(kind):
    model = tiny_transformer(kind)
    rtlynx.sparsify(model)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((mod, i[0].detach(), o.detach())))
             for m in rtlynx.sparse_layers(model).values()]
    with torch.no_grad():
        output_tensor(model(**example_inputs(model, batch=2)))
    for h in hooks:
        h.remove()
    assert len(seen) >= len(rtlynx.sparse_layers(model))
    for mod, x, y in seen:
        pad = (-x.shape[-1]) % 4  # Z-Image's SwiGLU width is not a multiple of 4: zero-padded groups
        x = torch.nn.functional.pad(x, (0, pad))
        xd = x.double()
        xp = xd * brute_mask(x, 2, 4)
        s = (xd.pow(2).sum(-1, keepdim=True) / (xp.pow(2).sum(-1, keepdim=True) + 1e-8)).sqrt()
        want = s * (xp @ torch.nn.functional.pad(mod.weight.double(), (0, pad)).T) + (mod.bias.double() if mod.bias is not None else 0)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


def test_summary_flop_share(kind):
    model = tiny_transformer(kind)
    rtlynx.sparsify(model)
    inputs = example_inputs(model, batch=1)
    s = rtlynx.summary(model, **inputs)
    assert s.flops_measured
    total = sum(l.flops for l in s.layers)
    sparse = sum(2 * l.in_features * l.out_features * l.rows for l in s.layers if l.sparse)
    assert s.sparse_flop_share == pytest.approx(sparse / total)
    assert 0.3 < s.sparse_flop_share < 1.0
    assert "linear layers sparse" in str(s)
    assert not rtlynx.summary(model).flops_measured


def test_sparsify_errors_and_overrides():
    model = tiny_transformer("flux")
    with pytest.raises(ValueError, match="no nn.Linear"):
        rtlynx.sparsify(model, preset=None, include=("does.not.exist",))
    with pytest.raises(ValueError):
        rtlynx.sparsify(model, preset="sd5")
    with pytest.raises(ValueError, match="preset=None"):
        rtlynx.SparsityConfig(preset=None)
    rtlynx.sparsify(model, exclude=("single_transformer_blocks.*",), n=1, m=4)
    layers = rtlynx.sparse_layers(model)
    assert layers and not any(n.startswith("single") for n in layers)
    assert all((l.n, l.m) == (1, 4) for l in layers.values())
    with pytest.raises(ValueError, match="already sparsified"):
        rtlynx.sparsify(model, exclude=("single_transformer_blocks.*",))
    with pytest.raises(ValueError):
        rtlynx.configure(model, mode="sideways")
    with pytest.raises(ValueError, match="compensation"):
        rtlynx.configure(model, mode="dense", compensation="bogus")
    assert all(l.mode == "sparse" for l in layers.values())  # nothing half-applied
    with pytest.raises(ValueError, match="sparsify first"):
        rtlynx.configure(nn.Linear(4, 4), mode="dense")


def test_default_preset_for_other_models():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.Module()
            self.norm1.linear = nn.Linear(8, 16)
            self.attn = nn.Linear(8, 8)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.time_embed = nn.Linear(8, 8)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.proj_out = nn.Linear(8, 4)

    m = Other()
    assert rtlynx.eligible_layers(m) == ["blocks.0.attn", "blocks.1.attn"]


def _save_model(tmp_path, kind="flux"):
    model = tiny_transformer(kind)
    rtlynx.sparsify(model, lora_rank=4)
    for layer in rtlynx.sparse_layers(model).values():
        layer.lora_B.data.normal_()
    return model, rtlynx.save(model, tmp_path / "lynx")


def test_save_load_roundtrip(tmp_path, kind):
    model, path = _save_model(tmp_path, kind)
    inputs = example_inputs(model, batch=2)
    with torch.no_grad():
        want = output_tensor(model(**inputs))
    fresh = tiny_transformer(kind)  # same seed -> same base weights
    rtlynx.load(fresh, path)
    assert list(rtlynx.sparse_layers(fresh)) == list(rtlynx.sparse_layers(model))
    with torch.no_grad():
        assert torch.equal(output_tensor(fresh(**inputs)), want)
    files = sorted(p.name for p in path.iterdir())
    assert files == ["rtlynx_config.json", "rtlynx_lora.safetensors"]
    base_bytes = sum(p.numel() for p in fresh.parameters()) * 4
    assert (path / "rtlynx_lora.safetensors").stat().st_size < base_bytes  # never the base weights


def test_save_refuses_to_overwrite(tmp_path):
    model, path = _save_model(tmp_path)
    before = (path / "rtlynx_lora.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        rtlynx.save(model, path)
    assert (path / "rtlynx_lora.safetensors").read_bytes() == before
    rtlynx.save(model, path, overwrite=True)


def _assert_untouched(model):
    assert not rtlynx.sparse_layers(model)


def test_load_errors_leave_model_untouched(tmp_path):
    model, path = _save_model(tmp_path)
    other = tiny_transformer("qwen-image")
    with pytest.raises(ValueError, match="saved for FluxTransformer2DModel"):
        rtlynx.load(other, path)
    _assert_untouched(other)
    with pytest.raises(ValueError):
        rtlynx.load(other, path, strict_class=False)  # layer names do not exist there
    _assert_untouched(other)

    import diffusers
    wider = diffusers.FluxTransformer2DModel(**{**TINY_CONFIGS["flux"][1], "attention_head_dim": 8,
                                                 "axes_dims_rope": [2, 2, 4]})
    with pytest.raises(ValueError, match="model has"):
        rtlynx.load(wider, path)
    _assert_untouched(wider)

    fresh = tiny_transformer("flux")
    with pytest.raises(FileNotFoundError):
        rtlynx.load(fresh, tmp_path / "nowhere")
    (path / "rtlynx_lora.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        rtlynx.load(fresh, path)
    (path / "rtlynx_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        rtlynx.load(fresh, path)
    _assert_untouched(fresh)


def _rehash(path):
    """Record the current LoRA file's sha256 in the config (as if saved that way)."""
    import hashlib
    import json

    cfg = json.loads((path / "rtlynx_config.json").read_text())
    cfg["lora_sha256"] = hashlib.sha256((path / "rtlynx_lora.safetensors").read_bytes()).hexdigest()
    (path / "rtlynx_config.json").write_text(json.dumps(cfg))


def test_load_rejects_wrong_lora_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    model, path = _save_model(tmp_path)
    t = load_file(str(path / "rtlynx_lora.safetensors"))
    key = next(k for k in t if k.endswith("lora_A"))
    t[key] = torch.zeros(3, t[key].shape[1])
    save_file(t, str(path / "rtlynx_lora.safetensors"))
    _rehash(path)  # past the checksum: the shape check itself
    fresh = tiny_transformer("flux")
    with pytest.raises(ValueError, match="saved shape"):
        rtlynx.load(fresh, path)
    _assert_untouched(fresh)


def test_config_dict_roundtrip():
    c = rtlynx.SparsityConfig(n=4, m=8, include=("a.*",), lora_rank=16)
    assert rtlynx.SparsityConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        rtlynx.SparsityConfig.from_dict({**c.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="version"):
        rtlynx.SparsityConfig(version=99)
    for bad in (dict(backend="x"), dict(compensation="var"), dict(lora_rank=-1), dict(eps=0), dict(k_remainder="x")):
        with pytest.raises(ValueError):
            rtlynx.SparsityConfig(**bad)


def test_default_preset_keeps_cross_attention_keys_values_dense():
    """Wan's attn2 keys / values read the text condition (conditioning-only layers): dense; its query reads the
    tokens: sparse, in a site of its own (no site whose members read different inputs)."""
    import warnings

    from rtlynx.integrations.diffusers import example_inputs, tiny_transformer

    model = tiny_transformer("wan")
    rtlynx.sparsify(model)
    names = set(rtlynx.sparse_layers(model))
    assert "blocks.0.attn2.to_q" in names and "blocks.0.attn1.to_k" in names
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a split site would warn
        with torch.no_grad():
            for _ in range(4):
                model(**example_inputs(model, batch=1))
