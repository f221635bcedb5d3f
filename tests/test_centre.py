"""Token-mean centring (SparsityConfig.centre="token_mean") on the CPU: every site path against a formula written out
here (brute-force 2:4 by sorting, the token mean by a sum), the calibration residual against the model's own sparse
output, the settings' checks and their round trip through save / load."""

import pytest
import torch

import rtlynx
from rtlynx import api, distill, sites

diffusers = pytest.importorskip("diffusers")
from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer  # noqa: E402
from test_sites import gen  # noqa: E402, F401  (the fixture: a generator seeded per test, its seed printed)


def brute_prune_24(x: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |x| of every 4 along the last dim (ties: the lower index), by a stable sort; a K that is
    not a multiple of 4 is zero-padded first (what the layers do, k_remainder="pad")."""
    k = x.shape[-1]
    xp = torch.nn.functional.pad(x, (0, -k % 4))
    g = xp.reshape(*x.shape[:-1], -1, 4)
    order = torch.sort(-g.abs(), dim=-1, stable=True).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return torch.where(keep, g, torch.zeros_like(g)).reshape(xp.shape)[..., :k]


def formula(layer, x: torch.Tensor) -> torch.Tensor:
    """y = s * prune(x - c) W^T + c W^T + b + (x A^T) B^T, c the token mean of each sample, in float64."""
    xd = x.detach().double()
    c = xd.sum(-2, keepdim=True) / xd.shape[-2]
    xs = xd - c
    xp = brute_prune_24(xs)
    s = (xs.pow(2).sum(-1, keepdim=True) / (xp.pow(2).sum(-1, keepdim=True) + layer.eps)).sqrt()
    w = layer.dense_weight().detach().double()
    y = s * (xp @ w.T) + c @ w.T
    if layer.bias is not None:
        y = y + layer.bias.detach().double()
    if layer.lora_A is not None and layer.lora_enabled:
        y = y + (xd @ layer.lora_A.detach().double().T) @ layer.lora_B.detach().double().T
    return y


def _e4m3_rows(v: torch.Tensor) -> torch.Tensor:
    """float64 per-row absmax e4m3 quantise-dequantise (scale absmax / 448, torch's round-to-nearest-even cast)."""
    scale = v.abs().amax(-1, keepdim=True) / 448.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (v / safe).clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale


def fp8_formula(layer, x: torch.Tensor) -> torch.Tensor:
    """The FP8 site, centred, in float64: y = s Q(prune(x - c)) Q(W)^T + c Q(W)^T + b + (x A^T) B^T (Q: e4m3; the
    site computes c Q(W)^T from c's FP8 rows, whose residual pair leaves ~2^-8 of c)."""
    xd = x.detach().double()
    c = xd.sum(-2, keepdim=True) / xd.shape[-2]
    xs = (xd - c).to(x.dtype).double()  # x - c rounded once to x's dtype, as the site computes it
    xp = brute_prune_24(xs)
    s = (xs.pow(2).sum(-1, keepdim=True) / (xp.pow(2).sum(-1, keepdim=True) + layer.eps)).sqrt()
    w = layer.dense_weight().detach().double()
    wq = _e4m3_rows(w)
    y = s * (_e4m3_rows(xp) @ wq.T) + c @ wq.T
    if layer.bias is not None:
        y = y + layer.bias.detach().double()
    if layer.lora_A is not None and layer.lora_enabled:
        y = y + (xd @ layer.lora_A.detach().double().T) @ layer.lora_B.detach().double().T
    return y


def _grab_inputs(model):
    seen, hooks = {}, []

    def hook(name):
        def fn(mod, args, out):  # the first call of each layer (returns None: the output stays)
            seen.setdefault(name, (args[0].detach().clone(), out.detach().clone()))
        return fn

    for name, layer in api.sparse_layers(model).items():
        hooks.append(layer.register_forward_hook(hook(name)))
    return seen, hooks


def _random_lora(model, gen):
    with torch.no_grad():
        for l in api.sparse_layers(model).values():
            l.lora_B.copy_(torch.randn(l.lora_B.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("dtype", ["native", "fp8"])
@pytest.mark.parametrize("kind", ["flux", "qwen-image", "z-image"])
def test_reference_path_matches_the_formula(kind, dtype, gen):
    """fp32 model, reference backend, batch 2 (one centre per sample): each layer's output against the formula on
    the input it saw (GELU sites included: centring takes them off the fused GELU path). FP8 (emulated): found
    6e-4 to 9e-4 from its formula (c Q(W)^T exact there; the site's FP8 centre rows keep ~2^-8 of c), which is 3 %
    from the formula without the e4m3 rounding and 30 % from uncentred 2:4."""
    model = tiny_transformer(kind)
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, lora_rank=4, backend="reference", centre="token_mean", dtype=dtype)
    _random_lora(model, gen)
    seen, hooks = _grab_inputs(model)
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    layers = api.sparse_layers(model)
    assert set(seen) == set(layers)
    for name, (x, y) in seen.items():
        want = (formula if dtype == "native" else fp8_formula)(layers[name], x)
        err = float((y.double() - want).norm() / want.norm())
        assert err < (1e-5 if dtype == "native" else 2e-3), (name, err)  # FP8: c's rows leave ~2^-8 of c W^T
        if dtype == "fp8":  # the quantisation is really there
            assert float((formula(layers[name], x) - want).norm() / want.norm()) > 1e-3, name


def test_centring_changes_the_output(gen):
    """The option is live: the same model without centring gives other outputs (and closer ones to dense here)."""
    model = tiny_transformer("flux")
    inputs = example_inputs(model, batch=2)
    with torch.no_grad():
        dense = output_tensor(model(**inputs))
    rtlynx.sparsify(model, backend="reference")
    with torch.no_grad():
        plain = output_tensor(model(**inputs))
    rtlynx.configure(model, centre="token_mean")
    with torch.no_grad():
        centred = output_tensor(model(**inputs))
    assert not torch.allclose(plain, centred)
    assert (centred - dense).norm() < (plain - dense).norm()


@pytest.mark.parametrize("in_kernel", [True, False])
@pytest.mark.parametrize("kind", ["flux", "z-image"])
@pytest.mark.parametrize("dtype", ["native", "fp8"])
def test_fused_sites_match_the_spec(fused_cpu, gen, kind, dtype, in_kernel, monkeypatch):
    """The fused site path (kernel twins) with centring, bf16 and FP8 sites: sites.verify against the fp32 centred
    spec of the family, with one token-mean pass per site input shared by its members (the centre rides in the site
    GEMM as extra rows a sample, two for native sites, four for FP8; x - c is formed in the prune kernel, twinned
    by rtlynx.reference.sm90.centred_operand; ``in_kernel`` False: a library without the centring prune, the site
    GEMM on ``[x - c; rows]`` written out)."""
    if not in_kernel:
        monkeypatch.setattr(rtlynx.ops, "centre_in_kernels", lambda dtype="native": False)
    model = tiny_transformer(kind).to(torch.bfloat16)
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, lora_rank=4, speed_rules=False, centre="token_mean", dtype=dtype)
    _random_lora(model, gen)
    calls = []
    real = rtlynx.reference.token_mean  # what the site path calls (the spec reaches it inside rtlynx.reference.nm)

    def counting(x):
        calls.append(x.shape)
        return real(x)

    twin_centred = []  # the kernel twins' centring (rtlynx.reference.sm90.centred_operand): once per site call
    real_op = rtlynx.reference.sm90.centred_operand
    monkeypatch.setattr(rtlynx.reference.sm90, "centred_operand",
                        lambda *a: twin_centred.append(1) or real_op(*a))
    rtlynx.reference.token_mean = counting
    try:
        errs = sites.verify(model, **inputs)
    finally:
        rtlynx.reference.token_mean = real
    assert len(errs) == len(sites.model_sites(model)) and max(errs.values()) < 1e-2, errs
    assert len(calls) == len(sites.model_sites(model))  # one centre per site input, not one per member
    assert len(fused_cpu.calls) > 0  # the fused path ran (kernel twins)
    # every fused site call centred inside its prune (the twins), or none did
    assert len(twin_centred) == (len(fused_cpu.calls) if in_kernel else 0), (twin_centred, fused_cpu.calls)


def test_calibration_residual_is_the_models_residual(gen):
    """LayerStats with centring: the residual energy it accumulates is |dense - sparse|^2 of the model's own layer
    (LoRA off), computed here by running the layer both ways on the same input."""
    model = tiny_transformer("flux")
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, backend="reference", centre="token_mean")
    groups = [g for g in distill.stat_groups(model) if g.layers[0].startswith("transformer_blocks.0.attn")]
    stats = distill.collect(model, lambda: model(**inputs), groups=groups)
    seen, hooks = _grab_inputs(model)
    with torch.no_grad(), api.dense_mode(model):
        model(**inputs)
    for h in hooks:
        h.remove()
    layers = api.sparse_layers(model)
    for name in groups[0].layers:
        x, dense = seen[name]
        with torch.no_grad():
            sparse = layers[name](x)
        want = float((dense.double() - sparse.double()).pow(2).sum())
        assert stats.layers[name].rr == pytest.approx(want, rel=1e-3), name
        plain = float((dense.double() - distill_plain(layers[name], x)).pow(2).sum())
        assert stats.layers[name].rr < plain  # centring leaves less residual here than plain 2:4


def distill_plain(layer, x):
    """The plain (uncentred) RT-Lynx output of ``layer`` without LoRA, float64."""
    xd = x.detach().double()
    xp = brute_prune_24(xd)
    s = (xd.pow(2).sum(-1, keepdim=True) / (xp.pow(2).sum(-1, keepdim=True) + layer.eps)).sqrt()
    y = s * (xp @ layer.dense_weight().detach().double().T)
    return y + layer.bias.detach().double() if layer.bias is not None else y


def test_settings_check_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="centre must be one of"):
        rtlynx.SparsityConfig(centre="mean")
    assert rtlynx.SparsityConfig(centre="token_mean", dtype="fp8").centre == "token_mean"  # FP8 sites centre too
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, lora_rank=2, centre="token_mean")
    rtlynx.save(model, tmp_path / "lynx")
    fresh = tiny_transformer("flux")
    rtlynx.load(fresh, tmp_path / "lynx")
    assert rtlynx.config_of(fresh).centre == "token_mean"


def test_one_token_is_its_own_centre(gen):
    """A single token (1-D input): x - c = 0, so the layer returns the dense output exactly (c W^T + b)."""
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, backend="reference", centre="token_mean")
    layer = model.transformer_blocks[0].attn.to_q
    x = torch.randn(layer.in_features, generator=gen)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.dense_weight(), layer.bias))


def test_row_centres_repeat_each_samples_mean(gen):
    """reference.row_centres: row r of x.reshape(-1, K) gets the float64 mean over its own sample's tokens."""
    from rtlynx import reference
    x = torch.randn(3, 5, 7, generator=gen).to(torch.bfloat16)
    got = reference.row_centres(x)
    want = x.double().mean(1, keepdim=True).expand(3, 5, 7).reshape(15, 7)
    assert got.shape == (15, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got[0], got[5])  # rows of different samples get different centres


def test_row_parallel_site_refuses_centring(gen):
    """A K-split (row-parallel) site holds a slice of each token: it refuses centring in one line, before any
    collective (a hand-built shard, as tests/test_parallel.py makes them)."""
    import dataclasses

    from rtlynx import parallel
    from rtlynx.sites import Site

    layer = rtlynx.SparseActLinear(torch.nn.Linear(64, 32), speed_rules=False)
    layer._tp = parallel.Shard("rowwise", (128,), None, 0, 2)
    Site([layer], "plain", "row")
    layer._settings.config = dataclasses.replace(layer._settings.config, centre="token_mean")
    with pytest.raises(NotImplementedError, match="row-parallel"):
        layer(torch.randn(3, 64, generator=gen))
