"""Users' adapters in the LoRA tail of the lynx site kernels (Hopper), bf16 and FP8 sites: the kernels with the adapter
against the per-layer spec + the adapter by hand (the CPU twin tests' helpers, tests/test_user_lora_tail.py), against
the same kernels with the adapter as PEFT's GEMMs (adapter_rank=0), and tiny FLUX against dense + the same adapter;
torch.compile (inductor) through hotswaps without a new graph. Random values: the autouse seed fixture."""

import copy
import warnings

import pytest
import torch

import rtlynx
from rtlynx import sites

from conftest import load_benchmark
from test_user_lora_tail import K, NS, build, peft_calls, rel, spec

peft = pytest.importorskip("peft")

# per member against the float32 spec: bf16 rounds the output once; the FP8 path adds its bf16 h B^T after rounding
# the GEMM output to bf16 (tests/gpu/test_fp8_kernels.py: two roundings)
TOL = {"native": 1.5e-2, "fp8": 2e-2, "fp8-keep": 2e-2}


@pytest.fixture
def site_gemms(monkeypatch):
    calls = []
    real = sites.Site._gemm  # every site GEMM, of any kernel family
    monkeypatch.setattr(sites.Site, "_gemm", lambda self, *a, **kw: calls.append(a[3]) or real(self, *a, **kw))
    return calls


def _model(gen, kind, comp):
    dtype = "native" if kind == "native" else "fp8"
    return build(gen, comp, dtype=dtype, device="cuda", keep_dense_weights=kind == "fp8-keep")


@pytest.mark.parametrize("rows", [1, 7, 333, 4096])
@pytest.mark.parametrize("comp", [0, 16])
@pytest.mark.parametrize("kind", ["native", "fp8", "fp8-keep"])
def test_site_kernels_with_adapters_match_sparse_plus_adapters(gen, site_gemms, rows, comp, kind):
    _, model = _model(gen, kind, comp)
    site = rtlynx.sparse_layers(model)["to_q"]._site
    assert site._carry == [True] * 3 and site._fp8_stored == (kind == "fp8")
    calls = peft_calls(model)
    x = torch.randn(rows, K, generator=gen).to("cuda", torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        outs = [y.clone() for y in model(x)]
    assert calls == [] and site_gemms == [2]  # one site GEMM pass, the whole tail; PEFT ran nothing
    rtlynx.configure(model, adapter_rank=0)  # the same kernels, the adapters as PEFT's GEMMs
    with torch.no_grad():
        peft_outs = model(x)
    assert len(calls) == 5
    rtlynx.configure(model, adapter_rank="auto")
    for name, y, yp in zip(NS, outs, peft_outs):
        want = spec(model, name, x)
        assert rel(y, want) < TOL[kind], (name, rel(y, want))
        assert rel(y, yp) < TOL[kind], (name, rel(y, yp))
        assert rel(spec(model, name, x, adapters=False), want) > 10 * TOL[kind]  # the adapters matter


@pytest.mark.parametrize("kind", ["native", "fp8"])
def test_tiny_flux_on_kernels_with_adapter_vs_dense_plus_adapter(gen, kind):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer
    from test_user_lora import ERR_RATIO, lora_config, randomize_adapter

    def forward(m):
        with torch.no_grad():
            return output_tensor(m(**inputs)).float()

    base = tiny_transformer("flux").cuda().to(torch.bfloat16)
    inputs = example_inputs(base, batch=2)
    plain = rtlynx.sparsify(copy.deepcopy(base), speed_rules=False, dtype=kind)
    sparse_err = rel(forward(plain), forward(base))
    dense = copy.deepcopy(base)
    dense.add_adapter(lora_config(dense, r=8))
    randomize_adapter(dense, torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=gen))))
    ref = forward(dense)
    model = rtlynx.sparsify(copy.deepcopy(base), speed_rules=False, dtype=kind)
    model.add_adapter(lora_config(base, r=8))
    set_peft_model_state_dict(model, get_peft_model_state_dict(dense))
    carried = sum(sum(s._carry) for s in sites.model_sites(model))
    assert carried == len(rtlynx.sparse_layers(model))  # every sparse layer carries its adapter in the tail
    out = forward(model)
    errs = sites.verify(model, **inputs)
    assert errs and max(errs.values()) < TOL[kind], errs
    err = rel(out, ref)
    assert err < ERR_RATIO * sparse_err, f"sparse + adapter {err:.4f} vs dense + adapter; sparse alone {sparse_err:.4f}"
    rtlynx.configure(model, adapter_rank=0)
    assert rel(out, forward(model)) < 0.1  # whole forwards drift apart (near-tie flips downstream), but stay close
    if kind == "native":
        with rtlynx.dense_mode(model):
            assert torch.equal(forward(model), ref)


def test_compiled_hotswap_on_the_kernels_does_not_recompile(gen):
    from torch._dynamo.backends.registry import lookup_backend

    from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer

    bench = load_benchmark("user_lora")  # its random rank-16 adapters on FLUX's block linears
    model = rtlynx.sparsify(tiny_transformer("flux").cuda().to(torch.bfloat16), speed_rules=False)
    inputs = example_inputs(model, batch=2)
    sd_a, sd_b = bench.adapter_state(model, 1), bench.adapter_state(model, 2)
    assert all(f"{n}.lora_A.weight" in sd_a for n in rtlynx.sparse_layers(model) if "blocks" in n)
    model.enable_lora_hotswap(target_rank=bench.RANK)
    model.load_lora_adapter(sd_a, adapter_name="style", prefix=None)
    graphs = []
    inductor = lookup_backend("inductor")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return inductor(gm, example_inputs)

    def forward(m):
        with torch.no_grad():
            return output_tensor(m(**inputs)).float()

    eager = forward(model)  # first: an eager call validates the sites once (a compiled call would not)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting)
    try:
        first = forward(compiled)
        assert len(graphs) == 1
        assert rel(first, eager) < 1e-2  # compiled vs eager, the same tail
        model.load_lora_adapter(sd_b, adapter_name="style", prefix=None, hotswap=True)
        swapped = forward(compiled)
        assert len(graphs) == 1, f"{len(graphs) - 1} recompiles on hotswap"
        assert rel(swapped, forward(model)) < 1e-2 and rel(swapped, first) > 1e-3
    finally:
        torch._dynamo.reset()
