"""Activation sites (rtlynx.sites) on the CPU: grouping from the presets, the shared operand (no weight copy), the
one-settings rule (configure -> save -> load), and the fused dispatch logic driven by the reference twin of the
site kernel (rtlynx.reference.sm90.site_linear_sm90)."""

import pytest
import torch
import torch.nn as nn

import rtlynx
from rtlynx import api, reference, sites
from rtlynx.reference import sm90 as ref90

diffusers = pytest.importorskip("diffusers")
from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer  # noqa: E402

SEED = 20261203


@pytest.fixture
def gen(request):
    seed = SEED + sum(map(ord, request.node.name))
    print(f"seed {seed}")  # reproduce a failure with this seed
    return torch.Generator().manual_seed(seed)


def _site_groups(model):
    name_of = {id(l): n for n, l in api.sparse_layers(model).items()}
    return {s.name: ([name_of[id(l)] for l in s.layers], s.producer) for s in sites.model_sites(model)}


def test_flux_sites_follow_the_preset():
    model = tiny_transformer("flux")
    rtlynx.sparsify(model)
    g = _site_groups(model)
    assert g["transformer_blocks.0.attn"] == (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                               "transformer_blocks.0.attn.to_v"], "plain")
    assert g["single_transformer_blocks.1"][0] == [
        "single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k",
        "single_transformer_blocks.1.attn.to_v", "single_transformer_blocks.1.proj_mlp"]
    assert g["transformer_blocks.1.ff"] == (["transformer_blocks.1.ff.net.2"], "gelu")
    assert g["transformer_blocks.1.ff.net.0.proj"] == (["transformer_blocks.1.ff.net.0.proj"], "plain")
    assert g["single_transformer_blocks.1.proj_out"] == (["single_transformer_blocks.1.proj_out"], "plain")
    # every sparse layer in exactly one site
    names = [n for members, _ in g.values() for n in members]
    assert sorted(names) == sorted(api.sparse_layers(model))


@pytest.mark.parametrize("kind,expect", [
    ("qwen-image", {"transformer_blocks.0.attn": 3, "transformer_blocks.0.img_mlp": 1}),
    ("z-image", {"layers.0.attention": 3, "layers.0.feed_forward": 2, "noise_refiner.0.attention": 3}),
])
def test_other_models_sites(kind, expect):
    model = tiny_transformer(kind)
    rtlynx.sparsify(model)
    g = _site_groups(model)
    for name, count in expect.items():
        assert len(g[name][0]) == count, (name, g.get(name))
    if kind == "qwen-image":
        assert g["transformer_blocks.0.img_mlp"][1] == "gelu"


def test_group_sites_rules_are_data():
    names = ["b.0.attn.to_q", "b.0.attn.to_k", "b.0.ff.net.2", "b.1.attn.to_v", "x.to_q", "solo"]
    rules = (("b.*.attn", "plain", ("to_q", "to_k", "to_v")), ("*", "gelu", ("net.2",)))
    got = sites.group_sites(names, rules)
    assert got == [(["b.0.attn.to_q", "b.0.attn.to_k"], "plain", "b.0.attn"), (["b.0.ff.net.2"], "gelu", "b.0.ff"),
                   (["b.1.attn.to_v"], "plain", "b.1.attn"), (["x.to_q"], "plain", "x.to_q"), (["solo"], "plain", "solo")]


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("rank", [0, 8])
def test_parameters_are_views_of_one_operand(rank, gen):
    model = tiny_transformer("flux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bytes_before = sum(p.numel() * p.element_size() for p in model.parameters())
    rtlynx.sparsify(model, lora_rank=rank)
    site = model.transformer_blocks[0].attn.to_q._site
    layers = site.layers
    assert len(layers) == 3
    for l in layers:
        assert _storage(l.weight) == _storage(site.wext)
        if rank:
            assert _storage(l.lora_B) == _storage(site.wext) and _storage(l.lora_A) == _storage(site.lora_a)
    # the operand is [W_cat | 0 | B expanded] of the layers' own parameters (independent construction)
    w_cat = torch.cat([l.weight.detach() for l in layers])
    if rank:
        with torch.no_grad():
            for l in layers:
                l.lora_B.copy_(torch.randn(l.lora_B.shape, generator=gen))
        b_diag = torch.block_diag(*[l.lora_B.detach() for l in layers])
        assert torch.equal(site.wext, ref90.expand_lora_b(w_cat, b_diag, site.k))
    else:
        assert torch.equal(site.wext, ref90.expand_lora_b(w_cat, None, site.k))
    # state_dict keys and values unchanged (LoRA tensors are extra)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    # no second copy of any weight: the distinct storages are exactly the dense parameters' and the sites' operands
    storages = {_storage(p): p.untyped_storage().nbytes() for p in model.parameters()}
    expected = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if not isinstance(model.get_submodule(n.rpartition(".")[0]), rtlynx.SparseActLinear))
    for s in sites.model_sites(model):
        expected += sum(t.numel() * t.element_size() for t in (s.wext, s.bias, s.lora_a) if t is not None)
    assert sum(storages.values()) == expected
    del bytes_before


def test_load_state_dict_reaches_the_operand(gen):
    model = tiny_transformer("flux")
    rtlynx.sparsify(model)
    sd = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    site = model.transformer_blocks[0].attn.to_q._site
    w_cat = torch.cat([sd[f"transformer_blocks.0.attn.{n}.weight"] for n in ("to_q", "to_k", "to_v")])
    assert torch.equal(site.wext[:, : site.k], w_cat)


def test_configure_save_load_gives_identical_outputs(tmp_path):
    model = tiny_transformer("flux")
    inputs = example_inputs(model)
    rtlynx.sparsify(model, lora_rank=4)
    with torch.no_grad():
        for l in api.sparse_layers(model).values():
            l.lora_B.normal_()
    rtlynx.configure(model, compensation="none", backend="reference")
    want = output_tensor(model(**inputs))
    rtlynx.save(model, tmp_path / "s")
    fresh = tiny_transformer("flux")
    rtlynx.load(fresh, tmp_path / "s")
    assert rtlynx.config_of(fresh).compensation == "none"
    assert torch.equal(output_tensor(fresh(**inputs)), want)
    # one settings object: every layer reads the model's config, configure changes all of them
    st = api.settings_of(fresh)
    assert all(l._settings is st for l in api.sparse_layers(fresh).values())
    rtlynx.configure(fresh, compensation="norm")
    assert all(l.compensation == "norm" for l in api.sparse_layers(fresh).values())


def test_dense_mode_and_layer_override_do_not_leak():
    model = tiny_transformer("flux")
    inputs = example_inputs(model)
    dense = output_tensor(model(**inputs))
    rtlynx.sparsify(model)
    layer = model.transformer_blocks[0].attn.to_q
    layer.mode = "dense"  # an ablation override
    with rtlynx.dense_mode(model):
        assert torch.equal(output_tensor(model(**inputs)), dense)
    assert layer.mode == "dense" and model.transformer_blocks[0].attn.to_k.mode == "sparse"
    rtlynx.configure(model, mode="sparse")  # configure is authoritative: the override is dropped
    assert layer.mode == "sparse"


def test_to_dtype_rebuilds_the_operand():
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, lora_rank=4, backend="reference")
    inputs = example_inputs(model)
    model.to(torch.float64)
    site = model.transformer_blocks[0].attn.to_q._site
    assert site.wext.dtype == torch.float64
    assert all(_storage(l.weight) == _storage(site.wext) for l in site.layers)
    inputs = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    out = output_tensor(model(**inputs))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_unsparsify_gives_back_independent_contiguous_weights(tmp_path):
    from safetensors.torch import save_file

    model = tiny_transformer("flux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ff_class = type(model.transformer_blocks[0].ff)
    rtlynx.sparsify(model, lora_rank=4)
    assert type(model.transformer_blocks[0].ff) is not ff_class  # the GELU producer is wired in
    rtlynx.unsparsify(model)
    assert type(model.transformer_blocks[0].ff) is ff_class and "forward" not in model.transformer_blocks[0].ff.__dict__
    sd = model.state_dict()
    for k, v in before.items():
        assert torch.equal(sd[k], v)
        assert sd[k].is_contiguous() and sd[k].untyped_storage().nbytes() == v.numel() * v.element_size(), k
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))  # refuses shared storage


def test_speed_rules_reported_in_summary():
    model = tiny_transformer("flux")
    rtlynx.sparsify(model)
    text = str(rtlynx.summary(model))
    assert "dense on the GPU kernels by the speed rules: K=" in text
    rtlynx.configure(model, speed_rules=False)
    assert "speed rules" not in str(rtlynx.summary(model))


# ------------------------------------------------------------------ fused dispatch, driven by the reference twin
# (the fused_cpu fixture: tests/conftest.py)
def _qkv_module(gen, k=256, n=(128, 128, 64), rank=8, bias=True):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = (nn.Linear(k, nn_, bias=bias) for nn_ in n)

        def forward(self, x, ctx=None):
            c = x if ctx is None else ctx
            return self.to_q(x), self.to_k(c), self.to_v(c)

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = Attn().to(torch.bfloat16)
    rtlynx.sparsify(m, preset=None, include=("to_*",), lora_rank=rank, speed_rules=False)
    with torch.no_grad():
        for l in api.sparse_layers(m).values():
            if l.lora_B is not None:
                l.lora_B.copy_(torch.randn(l.lora_B.shape, generator=gen) * 0.1)
    return m


def _per_layer_spec(layer, x):
    """The layer's output by the reference spec (rtlynx.reference), in float32 from the bf16 operands."""
    a = b = None
    if layer.lora_A is not None:
        a, b = layer.lora_A.float(), layer.lora_B.float()
    return reference.sparse_act_linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float(),
                                       2, 4, "norm", a, b)


@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_fused_site_one_gemm_matches_the_per_layer_spec(fused_cpu, gen, rank, rows):
    m = _qkv_module(gen, rank=rank)
    x = torch.randn(2, rows, 256, generator=gen).to(torch.bfloat16)
    q, k, v = m(x)
    assert len(fused_cpu.calls) == 1 and fused_cpu.calls[0][1][0] == 320  # one GEMM, N = 128 + 128 + 64
    for out, layer in zip((q, k, v), (m.to_q, m.to_k, m.to_v)):
        assert out.shape == (2, rows, layer.out_features)
        torch.testing.assert_close(out.float(), _per_layer_spec(layer, x), rtol=2e-2, atol=2e-2)
    assert m.to_q._site._pending is None  # every member consumed: nothing held


def test_fused_site_repeated_forwards_take_the_fast_path(fused_cpu, gen):
    m = _qkv_module(gen, rank=8)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    for _ in range(3):
        q, k, v = m(x.clone())
    assert len(fused_cpu.calls) == 3 and m.to_q._site._fast is not None
    torch.testing.assert_close(v.float(), _per_layer_spec(m.to_v, x), rtol=2e-2, atol=2e-2)
    rtlynx.configure(m, compensation="none")  # a new config: every check runs again
    assert m(x)[0] is not None and len(fused_cpu.calls) == 4


def test_fused_site_lora_off_skips_the_tail(fused_cpu, gen):
    m = _qkv_module(gen, rank=8)
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    rtlynx.configure(m, lora=False)
    q, _, _ = m(x)
    assert fused_cpu.calls[-1][1] == (320, 256)  # wext[:, :Kp]: the tail is not read
    m.to_q.lora_A = None  # compare against the spec without LoRA
    torch.testing.assert_close(q.float(), _per_layer_spec(m.to_q, x), rtol=2e-2, atol=2e-2)


def test_site_with_different_inputs_splits_and_stays_correct(fused_cpu, gen):
    m = _qkv_module(gen, rank=0)
    x = torch.randn(9, 256, generator=gen).to(torch.bfloat16)
    ctx = torch.randn(4, 256, generator=gen).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="not called with one input"):
        for _ in range(4):
            q, k, v = m(x, ctx)
    assert m.to_q._site._split
    torch.testing.assert_close(q.float(), _per_layer_spec(m.to_q, x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(v.float(), _per_layer_spec(m.to_v, ctx), rtol=2e-2, atol=2e-2)
    n = len(fused_cpu.calls)
    m(x, ctx)
    assert len(fused_cpu.calls) == n + 3  # one GEMM per layer once split


def test_inplace_change_of_the_input_is_not_served_from_the_cache(fused_cpu, gen):
    m = _qkv_module(gen, rank=0)
    x = torch.randn(9, 256, generator=gen).to(torch.bfloat16)
    q = m.to_q(x)
    x.mul_(2)
    k = m.to_k(x)
    assert len(fused_cpu.calls) == 2
    torch.testing.assert_close(k.float(), _per_layer_spec(m.to_k, x), rtol=2e-2, atol=2e-2)
    del q


def test_fused_site_under_inference_mode(fused_cpu, gen):
    m = _qkv_module(gen, rank=0)
    with torch.inference_mode():
        x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
        q, k, v = m(x)
    assert len(fused_cpu.calls) == 1
    torch.testing.assert_close(k.float(), _per_layer_spec(m.to_k, x), rtol=2e-2, atol=2e-2)


def test_replaced_parameter_rebuilds_the_operand(fused_cpu, gen):
    m = _qkv_module(gen, rank=0)
    new = torch.randn(128, 256, generator=gen).to(torch.bfloat16)
    m.to_k.weight = nn.Parameter(new)  # a user swaps a parameter object
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    _, k, _ = m(x)
    assert _storage(m.to_k.weight) == _storage(m.to_k._site.wext)
    torch.testing.assert_close(k.float(), _per_layer_spec(m.to_k, x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["flux", "qwen-image", "z-image"])
def test_verify_finds_a_wrong_site(fused_cpu, gen, kind):
    """sites.verify compares each site with the fp32 per-layer spec: small for the twin, large for a broken op."""
    model = tiny_transformer(kind).to(torch.bfloat16)
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, lora_rank=4, speed_rules=False)
    with torch.no_grad():
        for l in api.sparse_layers(model).values():
            l.lora_B.copy_(torch.randn(l.lora_B.shape, generator=gen) * 0.05)
    errs = sites.verify(model, **inputs)
    assert len(errs) == len(sites.model_sites(model)) and max(errs.values()) < 1e-2, errs
    import rtlynx.ops as ops

    def broken(*a, **kw):  # no norm compensation
        return fused_cpu(*a[:5], False, *a[6:], **kw)

    ops.lynx_site_linear = ops.sparse_site = broken
    for s in sites.model_sites(model):
        s._fast = None
    errs = sites.verify(model, **inputs)
    assert max(errs.values()) > 1e-2


def test_load_state_dict_assign_marks_the_site_for_a_rebuild(fused_cpu, gen):
    m = _qkv_module(gen, rank=0)
    sd = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)  # new parameter objects
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    q, k, v = m(x)
    site = m.to_q._site
    assert all(_storage(l.weight) == _storage(site.wext) for l in site.layers)
    torch.testing.assert_close(v.float(), _per_layer_spec(m.to_v, x), rtol=2e-2, atol=2e-2)


def test_gelu_feedforward_override_matches_the_original(gen):
    """The GELU-producer FeedForward forward equals diffusers' own: dense mode bit for bit, sparse vs the layer."""
    model = tiny_transformer("flux")
    ff = model.transformer_blocks[0].ff
    h = torch.randn(2, 5, ff.net[0].proj.in_features, generator=gen)
    want = ff(h)
    base = type(ff)
    rtlynx.sparsify(model)
    assert type(ff) is not base and isinstance(ff, base)  # the producer subclass
    with rtlynx.dense_mode(model):
        assert torch.equal(ff(h), want)
    sparse = ff(h)
    up = ff.net[0]
    assert torch.equal(sparse, ff.net[2](up.gelu(up.proj(h))))
    ff.train()  # training with dropout p > 0 takes the original module-by-module path
    ff.net[1].p = 0.5
    torch.manual_seed(0)
    a = ff(h)
    torch.manual_seed(0)
    b = ff.net[3](ff.net[2](ff.net[1](up.gelu(up.proj(h))))) if len(ff.net) > 3 else \
        ff.net[2](ff.net[1](up.gelu(up.proj(h))))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{}, dict(lora_rank=4), dict(dtype="fp8", lora_rank=4)], ids=str)
def test_regional_compile_serves_every_block_with_one_graph(kwargs):
    """diffusers' regional compile (compile_repeated_blocks) compiles one graph per block class and reuses it for
    every block: the sparsified model needs no more graphs than the dense one. (A per-instance FeedForward forward
    made dynamo guard on its identity: one recompile per block, eager after 8; FLUX.1-dev FP8 95 -> 107-126 ms on
    an H100.) Counted with a backend that counts its compilations (dynamo's guards decide, whatever the backend)."""
    counts = {}
    for sparse in (False, True):
        model = tiny_transformer("flux")
        assert len(model.transformer_blocks) >= 2  # else nothing is reused
        if sparse:
            rtlynx.sparsify(model, **kwargs)
        graphs = []

        def counting(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        model.compile_repeated_blocks(backend=counting)
        inputs = example_inputs(model)
        with torch.no_grad():
            out = output_tensor(model(**inputs))
            again = output_tensor(model(**inputs))
        assert torch.equal(out, again)
        counts[sparse] = len(graphs)
    torch._dynamo.reset()
    assert counts[True] == counts[False], counts


def test_bad_inputs_are_refused():
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, exclude=("single_transformer_blocks.*",))
    with pytest.raises(ValueError, match="unsparsify it first"):  # other layers would still match: no half re-sparsify
        rtlynx.sparsify(model)
    for field in ("lora", "speed_rules", "fuse_sites"):
        with pytest.raises(ValueError, match=f"{field} must be a bool"):
            rtlynx.SparsityConfig(**{field: 1})
    with pytest.raises(ValueError, match="different widths"):
        sites.Site([rtlynx.SparseActLinear(nn.Linear(16, 8)), rtlynx.SparseActLinear(nn.Linear(32, 8))])


def test_site_operand_checks_on_meta_tensors():
    """The op layer's shape checks run without a GPU (meta tensors): each refusal is an Unsupported, not a crash."""
    import rtlynx.ops as ops

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    x, wext = meta(5, 256), meta(64, 256)
    assert [t.shape for t in ops.lynx_site_linear(x, wext, meta(64), None, (32, 32))] == [(5, 32), (5, 32)]
    for args, match in (((x, meta(64, 384), None, None, (64,)), "does not fit"),      # tail without lora_a
                        ((x, wext, None, None, (60, 4)), "multiples of 8"),
                        ((x, wext, meta(32), None, (64,)), "bias"),
                        ((x, meta(64, 384), None, meta(64, 128), (64,)), "lora_a"),
                        ((meta(5, 250), meta(64, 256), None, None, (64,)), "multiple of 8")):
        with pytest.raises(ops.Unsupported, match=match):
            ops.lynx_site_linear(*args)
