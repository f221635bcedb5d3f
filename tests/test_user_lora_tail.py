"""Users' adapters in the site kernels' LoRA tail (issue 20, item 2), on the CPU.

The site kernels are replaced by their reference twins (conftest.fused_cpu: rtlynx.reference.sm90.site_linear_sm90,
and the FP8 producer + GEMM of rtlynx.reference.fp8), so a site takes its fused path here on exactly the operands the
GPU kernels read: ``[W | 0 | B_comp | B_user expanded]`` against ``[prune(x) | 0 | h / s]``. The reference of every
output is independent of the tail code: the per-layer spec (rtlynx.reference.sparse_act_linear, or the FP8 spec) on
the layer's weights and compensation LoRA, plus each active adapter by hand from PEFT's own parameters,
``scale_u (x A_u^T) B_u^T`` in float64; the operand's layout is checked against rtlynx.reference.sm90.expand_lora_b.
Random values come from the autouse seed fixture (a failing test's report gives its seed).
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import rtlynx
from rtlynx import ops, reference
from rtlynx.reference import fp8 as ref_fp8
from rtlynx.reference.sm90 import expand_lora_b

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

from rtlynx.integrations.peft import SparseLoraLinear  # noqa: E402
from test_fp8_storage import store  # noqa: E402

K, NS = 200, {"to_q": 136, "to_k": 72, "to_v": 64}  # K not a multiple of 128, ranks below not of 64
TOL = 1e-2  # relative error of a bf16 output against the float32 spec (sparse layers alone: 2-4e-3)
ADAPTERS = {"a": dict(r=3, lora_alpha=6, target_modules=list(NS)),
            "b": dict(r=5, lora_alpha=5, target_modules=["to_q", "to_v"])}
WEIGHTS = {"a": 0.7, "b": 1.3}


class Attn(nn.Module):
    """Q, K, V read one input: one site of three members."""

    def __init__(self):
        super().__init__()
        for name, n in NS.items():
            setattr(self, name, nn.Linear(K, n))

    def forward(self, x):
        return [getattr(self, name)(x) for name in NS]


def wrappers(model) -> list:
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def activate(model, weights: dict) -> None:
    """What set_adapters does on each PEFT layer: these adapters active, with these weights."""
    for w in wrappers(model):
        w.set_adapter(list(weights))
        for name, s in weights.items():
            w.set_scale(name, s)


def build(gen, comp=8, dtype="native", stored=False, adapters=ADAPTERS, weights=WEIGHTS, device="cpu", **cfg):
    """(dense bf16 QKV model with PEFT adapters, the same sparsified): adapters added before sparsify, random
    factors of the size of the layer outputs, a random compensation LoRA of rank ``comp``."""
    dense = Attn().to(device, torch.bfloat16)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(device) * K ** -0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Already found a peft_config attribute" for the second adapter
        for name, kw in adapters.items():
            peft.inject_adapter_in_model(LoraConfig(**kw), dense, adapter_name=name)
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen).to(device) * p.shape[-1] ** -0.5)
    activate(dense, weights)
    model = copy.deepcopy(dense)
    rtlynx.sparsify(model, preset=None, include=["to_*"], lora_rank=comp, speed_rules=False, dtype=dtype, **cfg)
    with torch.no_grad():
        for layer in rtlynx.sparse_layers(model).values():
            if layer.lora_B is not None:
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen).to(device) * 0.05)
    if stored:
        store(model)  # the weights in FP8 only, as the FP8 kernels keep them on the GPU
    return dense, model


def by_hand(wrapper, x) -> torch.Tensor | float:
    """PEFT's adapters on x, from its own parameters, in float64: sum over the active ones of
    scale * ((x A^T) B^T + the LoRA bias)."""
    if wrapper.disable_adapters:
        return 0.0
    out = 0.0
    for n in wrapper.active_adapters:
        if n in wrapper.lora_A:
            lin_b = wrapper.lora_B[n]
            y = (x.double() @ wrapper.lora_A[n].weight.double().T) @ lin_b.weight.double().T
            if lin_b.bias is not None:
                y = y + lin_b.bias.double()
            out = out + float(wrapper.scaling[n]) * y
    return out


def spec(model, name, x, adapters=True) -> torch.Tensor:
    """One member's output by the per-layer spec (float32) plus, with ``adapters``, the adapters by hand."""
    layer = rtlynx.sparse_layers(model)[name]
    use = layer.lora_A is not None and layer.lora_enabled
    a, b = (layer.lora_A, layer.lora_B) if use else (None, None)
    if layer._settings.config.dtype == "fp8":
        wq = None if layer.weight_scale is None else (layer.weight, layer.weight_scale)
        y = ref_fp8.fp8_sparse_act_linear(x, None if wq else layer.weight, layer.bias, 2, 4, "norm", a, b,
                                          weight_q=wq)
    else:
        y = reference.sparse_act_linear(x.float(), layer.weight.float(), layer.bias.float(), 2, 4, "norm",
                                        None if a is None else a.float(), None if b is None else b.float())
    wrapper = model.get_submodule(name)
    return y.double() + (by_hand(wrapper, x) if adapters and wrapper is not layer else 0.0)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def peft_calls(model) -> list:
    """The adapters whose own GEMMs PEFT runs, one entry per call of a lora_A Linear."""
    calls = []
    for w in wrappers(model):
        for name, lin in w.lora_A.items():
            lin.register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


def run(model, x, grad=False):
    with torch.set_grad_enabled(grad):
        return model(x)


def check(model, x, outs, what=""):
    for name, y in zip(NS, outs):
        assert y.shape == (x.shape[0], NS[name]) and y.dtype == torch.bfloat16
        if x.shape[0]:
            err = rel(y, spec(model, name, x))
            assert err < TOL, f"{what}: {name} differs from sparse + its adapters by {err:.4f}"


def site_of(model):
    return rtlynx.sparse_layers(model)["to_q"]._site


# ---------------------------------------------------------------------------------------------- layout
def test_tail_layout_is_the_kernels_layout(gen):
    """One member, compensation rank 8, adapters of ranks 3 and 5: lora_a = [A_c; 0; s_a A_a; s_b A_b; 0] and
    wext = expand_lora_b(W, [B_c | 0 | B_a B_b | 0]), each segment padded to 64 rows."""
    adapters = {"a": dict(r=3, lora_alpha=6, target_modules=["to_q"]), "b": dict(r=5, lora_alpha=5,
                                                                             target_modules=["to_q"])}
    _, model = build(gen, adapters=adapters)
    site, layer, wrapper = site_of(model), rtlynx.sparse_layers(model)["to_q"], model.to_q
    assert len(site.layers) == 3 and site._uranks == (8, 0, 0) and site.rp == 128 and site._carry[0]
    sq = site.slices[0]
    b_logical = torch.zeros(site.n, site.rp, dtype=torch.bfloat16)
    b_logical[sq, :8] = layer.lora_B
    for lay, sl, off in zip(site.layers[1:], site.slices[1:], (8, 16)):
        b_logical[sl, off: off + 8] = lay.lora_B
    b_logical[sq, 64:67] = wrapper.lora_B["a"].weight
    b_logical[sq, 67:72] = wrapper.lora_B["b"].weight
    w = torch.cat([lay.weight for lay in site.layers])
    assert torch.equal(site.wext, expand_lora_b(w, b_logical, K))
    a_logical = torch.zeros(site.rp, K, dtype=torch.bfloat16)
    a_logical[:24] = torch.cat([lay.lora_A for lay in site.layers])
    a_logical[64:67] = (wrapper.lora_A["a"].weight.float() * float(wrapper.scaling["a"])).to(torch.bfloat16)
    a_logical[67:72] = (wrapper.lora_A["b"].weight.float() * float(wrapper.scaling["b"])).to(torch.bfloat16)
    torch.testing.assert_close(site.lora_a, a_logical, rtol=2 ** -8, atol=0)


# ---------------------------------------------------------------------------------------------- the fused tail
@pytest.mark.parametrize("rows", [0, 1, 7, 65])
@pytest.mark.parametrize("comp", [0, 8])
@pytest.mark.parametrize("kind", ["native", "fp8", "fp8-stored"])
def test_fused_tail_is_sparse_plus_the_adapters(fused_cpu, gen, rows, comp, kind):
    _, model = build(gen, comp, dtype="native" if kind == "native" else "fp8", stored=kind == "fp8-stored")
    site = site_of(model)
    assert site._carry == [True, True, True] and site.rp % 64 == 0
    calls = peft_calls(model)
    x = torch.randn(rows, K, generator=gen).to(torch.bfloat16)
    outs = run(model, x)
    assert calls == []  # PEFT ran none of its GEMMs: every adapter rode in the tail
    assert len(fused_cpu.calls) == 1  # one prune pass, one GEMM set for the three members
    if kind == "native":
        assert fused_cpu.calls[0][1] == (site.n, site.kp + 2 * site.rp)  # the whole tail read
    check(model, x, outs, kind)
    if rows:  # the adapters matter: applied once (not never, not twice)
        for name, y in zip(NS, outs):
            assert rel(y, spec(model, name, x, adapters=False)) > 10 * TOL


@pytest.mark.parametrize("kind", ["native", "fp8"])
def test_fused_tail_with_centring_covers_the_centre(fused_cpu, gen, kind):
    """centre="token_mean" with adapters in the tail, two samples: each member equals the centred spec plus its
    adapters on the dense x (adapter(x) = adapter(x - c) + adapter(c): native sites get adapter(c) from the centre's
    rows in the same GEMM, FP8 sites from the per-member back term), one site GEMM set, no PEFT GEMM."""
    _, model = build(gen, 8, dtype=kind, centre="token_mean")
    calls = peft_calls(model)
    x = torch.randn(2, 7, K, generator=gen).to(torch.bfloat16) + torch.randn(2, 1, K, generator=gen).to(torch.bfloat16)
    outs = run(model, x)
    assert calls == [] and len(fused_cpu.calls) == 1
    x2, c = x.reshape(-1, K), reference.row_centres(x)
    for name, y in zip(NS, outs):
        layer = rtlynx.sparse_layers(model)[name]
        if kind == "fp8":
            want = ref_fp8.fp8_sparse_act_linear(x2, layer.weight, layer.bias, 2, 4, "norm", layer.lora_A, layer.lora_B,
                                                 centre=c)
        else:  # x - c rounded to bf16 as the site rounds it, products in float32
            want = reference.sparse_act_linear(x2, layer.weight, layer.bias, 2, 4, "norm", layer.lora_A, layer.lora_B,
                                               compute_dtype=torch.float32, centre=c)
        want = want.double() + by_hand(model.get_submodule(name), x2)
        assert y.shape == (2, 7, NS[name]) and rel(y.reshape(-1, NS[name]), want) < TOL, name
        plain = reference.sparse_act_linear(x2.float(), layer.weight.float(), layer.bias.float(), 2, 4, "norm",
                                            layer.lora_A.float(), layer.lora_B.float(), centre=c)
        assert rel(y.reshape(-1, NS[name]), plain) > 10 * TOL  # the adapters are in it, c's share included


def test_adapter_changes_refill_the_tail_in_place(fused_cpu, gen):
    _, model = build(gen)
    site = site_of(model)
    buffers = (site.wext.data_ptr(), site.lora_a.data_ptr())
    x = torch.randn(9, K, generator=gen).to(torch.bfloat16)
    calls = peft_calls(model)
    check(model, x, run(model, x), "set_adapter a, b")
    for w in wrappers(model):
        w.set_scale("a", 2.0)
    check(model, x, run(model, x), "set_scale")
    activate(model, {"b": 0.5})  # to_k holds no b: nothing active there
    assert site._carry == [True, False, True]
    check(model, x, run(model, x), "set_adapter b")
    for w in wrappers(model):
        w.enable_adapters(False)
    assert site._carry == [False] * 3
    check(model, x, run(model, x), "disabled")
    for w in wrappers(model):
        w.enable_adapters(True)
    check(model, x, run(model, x), "enabled")
    with torch.no_grad():
        model.to_q.lora_B["b"].weight.mul_(-1.5)  # an in-place edit: seen by the next eager call
    check(model, x, run(model, x), "in-place edit")
    sd = {k: v * 0.5 for k, v in model.state_dict().items() if "lora_A.b" in k}
    model.load_state_dict(sd, strict=False)  # no call in between: the load itself refilled the rows
    u = site._uoffs[0]
    torch.testing.assert_close(site.lora_a[u: u + 5].float(), model.to_q.lora_A["b"].weight.float() * 0.5,
                               rtol=2 ** -7, atol=0)
    check(model, x, run(model, x), "load_state_dict")
    with pytest.warns(UserWarning, match="Setting active adapter to a"):
        for w in wrappers(model):
            w.delete_adapter("b")
    check(model, x, run(model, x), "delete_adapter")
    assert calls == [] and (site.wext.data_ptr(), site.lora_a.data_ptr()) == buffers  # never reallocated


def test_adapters_over_adapter_rank_run_as_peft_gemms(fused_cpu, gen):
    with pytest.warns(RuntimeWarning, match=r"rank 8 on one layer exceed adapter_rank=4.*adapter_rank=8"):
        _, model = build(gen, adapter_rank=4)
    site = site_of(model)
    assert site._uranks == (4, 4, 4) and site._carry == [False, True, False]
    calls = peft_calls(model)
    x = torch.randn(7, K, generator=gen).to(torch.bfloat16)
    check(model, x, run(model, x), "adapter_rank=4")
    assert sorted(calls) == ["a", "a", "b", "b"]  # to_q and to_v by PEFT, to_k in the tail
    rtlynx.configure(model, adapter_rank=8)
    assert site._uranks == (8, 8, 8) and site._carry == [True] * 3
    calls.clear()
    check(model, x, run(model, x), "adapter_rank=8")
    assert calls == []
    with pytest.raises(ValueError, match="adapter_rank"):
        rtlynx.configure(model, adapter_rank=-1)
    rtlynx.configure(model, adapter_rank=0)  # off: PEFT's GEMMs everywhere, no user rows
    assert site._uranks == (0, 0, 0) and site.rp == 64
    check(model, x, run(model, x), "adapter_rank=0")
    assert len(calls) == 5


def test_auto_room_grows_to_the_largest_active_set_and_keeps_it(fused_cpu, gen):
    _, model = build(gen, weights={"a": 1.0})
    site = site_of(model)
    assert site._uranks == (3, 3, 3)
    x = torch.randn(5, K, generator=gen).to(torch.bfloat16)
    activate(model, WEIGHTS)
    assert site._uranks == (8, 3, 8)  # grown: a reallocation
    check(model, x, run(model, x), "a + b")
    wext = site.wext.data_ptr()
    activate(model, {"a": 0.3})
    assert site._uranks == (8, 3, 8) and site.wext.data_ptr() == wext  # kept: a later swap back needs no other
    check(model, x, run(model, x), "a again")


def test_dense_mode_and_the_reference_path_keep_peft_gemms(fused_cpu, gen):
    dense, model = build(gen)
    x = torch.randn(6, K, generator=gen).to(torch.bfloat16)
    calls = peft_calls(model)
    with torch.no_grad(), rtlynx.dense_mode(model):
        for y, want in zip(model(x), dense(x)):
            assert torch.equal(y, want)  # exactly dense + PEFT
    assert len(calls) == 5 and not fused_cpu.calls
    rtlynx.configure(model, backend="reference")
    calls.clear()
    check(model, x, run(model, x), "reference backend")
    assert len(calls) == 5 and not fused_cpu.calls
    rtlynx.configure(model, backend="auto", lora=False)  # the compensation rows lead the tail: none of it is read
    calls.clear()
    check(model, x, run(model, x), "compensation LoRA off")
    site = site_of(model)
    assert len(calls) == 5 and fused_cpu.calls == [((6, K), (site.n, site.kp))]


def test_a_member_whose_adapters_cannot_ride_shares_the_site_gemm(fused_cpu, gen):
    """to_k's second adapter has a LoRA bias (no place in the tail): PEFT runs to_k's adapters, the site still
    computes its three outputs in one GEMM (to_k's rows of the full tail are zeros)."""
    adapters = {"a": ADAPTERS["a"], "c": dict(r=2, lora_alpha=2, target_modules=["to_k"], lora_bias=True)}
    _, model = build(gen, adapters=adapters, weights={"a": 0.7, "c": 1.1})
    with torch.no_grad():
        model.to_k.lora_B["c"].bias.normal_(generator=gen)
    site = site_of(model)
    assert site._carry == [True, False, True]
    calls = peft_calls(model)
    x = torch.randn(11, K, generator=gen).to(torch.bfloat16)
    check(model, x, run(model, x), "a LoRA bias on to_k")
    assert sorted(calls) == ["a", "c"] and len(fused_cpu.calls) == 1


def test_gradients_for_the_adapters_take_peft_gemms(fused_cpu, gen):
    _, model = build(gen)
    for w in wrappers(model):
        for n in w.lora_A:
            w.lora_A[n].weight.requires_grad_(True)
    calls = peft_calls(model)
    x = torch.randn(4, K, generator=gen).to(torch.bfloat16)
    outs = run(model, x, grad=True)
    assert len(calls) == 5 and len(fused_cpu.calls) == 1
    sum(y.float().sum() for y in outs).backward()
    assert model.to_q.lora_A["b"].weight.grad is not None
    check(model, x, [y.detach() for y in outs], "with gradients")
    calls.clear()
    check(model, x, run(model, x), "no_grad")
    assert calls == []


def test_a_fused_call_that_cannot_run_falls_back_with_the_adapters(fused_cpu, gen, monkeypatch):
    _, model = build(gen)

    def refuse(*args, **kwargs):
        raise ops.Unsupported("refused for the test")

    monkeypatch.setattr(ops, "lynx_site_linear", refuse)
    calls = peft_calls(model)
    x = torch.randn(3, K, generator=gen).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="cannot run fused"):
        outs = run(model, x)
    check(model, x, outs, "per-layer fallback")
    assert calls == []  # the wrapper skipped PEFT: the fallback added the adapters itself


def test_mixed_batch_adapter_names_excludes_the_tail(fused_cpu, gen):
    """PEFT's per-sample adapters (adapter_names=) call the sparse layer without the user rows, then add their own."""
    _, model = build(gen)
    x = torch.randn(2, K, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        y = model.to_q(x, adapter_names=["a", "__base__"])
    layer = rtlynx.sparse_layers(model)["to_q"]
    plain = spec(model, "to_q", x, adapters=False)
    wa = model.to_q
    delta = float(wa.scaling["a"]) * (x[:1].double() @ wa.lora_A["a"].weight.double().T) @ wa.lora_B["a"].weight.double().T
    assert rel(y[:1], plain[:1] + delta) < TOL and rel(y[1:], plain[1:]) < TOL
    assert isinstance(wa, SparseLoraLinear) and layer._site._carry[0]


def test_verify_counts_the_adapters_that_ride_in_the_tail(fused_cpu, gen):
    _, model = build(gen)
    x = torch.randn(8, K, generator=gen).to(torch.bfloat16)
    errs = rtlynx.sites.verify(model, x)
    assert len(errs) == 1 and max(errs.values()) < TOL  # the one site, against the spec with its adapters
    with torch.no_grad():
        model.to_k.lora_B["a"].weight.mul_(3)  # the tail refills (eager): verify follows
    assert max(rtlynx.sites.verify(model, x).values()) < TOL


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_tail_hotswap_and_set_adapters_do_not_recompile(fused_cpu, tmp_path, gen):
    """The tiny FLUX pipeline on the fused path (twins): LoRA hotswap (enable_lora_hotswap, then
    load_lora_weights(hotswap=True)) and set_adapters with new weights rewrite the tail in place, and the compiled
    transformer runs them without a new graph; each output equals sparse + the adapter loaded the plain way and run
    as PEFT's GEMMs (adapter_rank=0), eager."""
    from rtlynx.integrations.diffusers import example_inputs, output_tensor
    from rtlynx.testing import BUILDERS
    from test_user_lora import lora_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe, ref_pipe = BUILDERS["flux"](), BUILDERS["flux"]()
    # float64: the tail and PEFT's GEMMs sum in different orders; in float32 that rounding flips a near-tie of some
    # 2:4 selection downstream for some seeds (relative error up to 8e-4 on the output), in float64 it cannot
    for p in (pipe, ref_pipe):
        p.transformer.to(torch.float64)
    inputs = example_inputs(pipe.transformer)
    # on the sparse layers only: PEFT's own forward on a layer left dense reads its scale, which set_adapters turns
    # from the tensor enable_lora_hotswap made into a float (a recompile with or without rtlynx)
    file_a = lora_file(type(pipe), pipe.transformer, tmp_path / "a", gen, r=4, sparse_only=True)
    file_b = lora_file(type(pipe), pipe.transformer, tmp_path / "b", gen, r=2, sparse_only=True)
    rtlynx.sparsify(pipe)
    rtlynx.sparsify(ref_pipe, adapter_rank=0)
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(file_a, adapter_name="style")
    ref_pipe.load_lora_weights(file_a, adapter_name="style")
    carried = [s for s in rtlynx.sites.model_sites(pipe.transformer) if any(s._carry)]
    assert carried and all(s._uranks[i] in (0, 8) for s in carried for i in range(len(s.layers)))
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def out(model):
        with torch.no_grad():
            return output_tensor(model(**inputs)).float()

    def same(got, what):
        err = rel(got, out(ref_pipe.transformer))
        assert err < 1e-4, f"{what}: compiled tail vs sparse + PEFT GEMMs, relative error {err:.2e}"

    torch._dynamo.reset()
    compiled = torch.compile(pipe.transformer, backend=counting)
    try:
        first = out(compiled)
        assert len(graphs) == 1 and "lora_A" not in graphs[0].code  # PEFT's GEMMs are not in the graph
        same(first, "adapter a")
        pipe.load_lora_weights(file_b, adapter_name="style", hotswap=True)
        ref_pipe.delete_adapters("style")
        ref_pipe.load_lora_weights(file_b, adapter_name="style")
        swapped = out(compiled)
        same(swapped, "hotswapped to b")
        assert rel(swapped, first) > 1e-3
        for p in (pipe, ref_pipe):
            p.set_adapters(["style"], adapter_weights=[0.4])
        same(out(compiled), "set_adapters weight 0.4")
        assert len(graphs) == 1, f"{len(graphs) - 1} recompiles"
    finally:
        torch._dynamo.reset()
