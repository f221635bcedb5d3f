"""Users' own LoRA adapters (diffusers / PEFT) on a sparsified model (issue 20), on the CPU reference path.

The reference of every check is independent of rtlynx: the dense model with the same PEFT adapter, loaded or added by
diffusers / PEFT themselves. ``dense_mode`` must equal it exactly; sparse + adapter must be as close to it as sparse is
to dense without the adapter; the sparse layers are the same with and without an adapter, in either order. One layer
is also checked against a float64 brute-force computation (conftest.brute_sparse_act_linear + the adapter by hand).
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import rtlynx
from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer
from rtlynx.integrations.peft import SparseLoraLinear

from conftest import brute_sparse_act_linear

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402

# sparse + adapter vs dense + adapter, relative to sparse vs dense without one: the adapter changes the activations
# the pruning sees, so the errors could differ; measured about 1.0 (0.98-1.06 over seeds) on the tiny FLUX
ERR_RATIO = 2.5


def targets(model) -> list[str]:
    """Every layer rtlynx sparsifies, plus one dense layer inside the blocks (an adapter on a layer left dense)."""
    eligible = rtlynx.eligible_layers(model)
    dense = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in eligible
                 and ("to_out" in n or "to_add_out" in n))
    return [*eligible, dense]


def lora_config(model, r=4, alpha=8):
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets(model), init_lora_weights=False)


def randomize_adapter(model, gen, scale=0.3):
    """PEFT's init_lora_weights=False weights are large for a 64-wide model: small random ones instead."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * scale / p.shape[-1] ** 0.5)


def forward(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs)).float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_against(model, dense_ref, sparse_err, inputs, what):
    """dense_mode == dense_ref exactly; sparse error comparable to ``sparse_err`` (sparse vs dense, no adapter)."""
    with rtlynx.dense_mode(model):
        d = forward(model, inputs)
    assert torch.equal(d, dense_ref), f"{what}: dense_mode differs from dense + adapter by {(d - dense_ref).abs().max()}"
    err = rel(forward(model, inputs), dense_ref)
    assert 0 < err < ERR_RATIO * sparse_err, f"{what}: sparse + adapter error {err:.4f}, sparse alone {sparse_err:.4f}"


@pytest.fixture(scope="module")
def flux():
    return tiny_transformer("flux")


def plain_sparse(model, inputs):
    """(sparse layer names, sparse vs dense relative error) of ``model`` sparsified without an adapter."""
    s = rtlynx.sparsify(copy.deepcopy(model))
    return set(rtlynx.sparse_layers(s)), rel(forward(s, inputs), forward(model, inputs))


def with_adapter(flux, gen, fuse=False):
    """(inputs, sparse layer names and error without an adapter, dense + a random PEFT adapter, its output)."""
    inputs = example_inputs(flux)
    names, sparse_err = plain_sparse(flux, inputs)
    dense = copy.deepcopy(flux)
    dense.add_adapter(lora_config(dense))
    randomize_adapter(dense, gen)
    if fuse:
        dense.fuse_lora()
    return inputs, names, sparse_err, dense, forward(dense, inputs)


def test_adapter_added_before_sparsify_is_kept_on_the_sparse_layers(flux, gen):
    inputs, names, sparse_err, dense, ref = with_adapter(flux, gen)
    model = rtlynx.sparsify(copy.deepcopy(dense))
    assert set(rtlynx.sparse_layers(model)) == names  # every layer, under its own name
    assert all(type(model.get_submodule(n)) is SparseLoraLinear for n in names)
    check_against(model, ref, sparse_err, inputs, "adapter before sparsify")
    # one layer against float64 by hand: brute-force 2:4 + norm scale + the adapter on the dense x
    wrapper = model.get_submodule("transformer_blocks.0.attn.to_q")
    x = torch.randn(5, wrapper.in_features, generator=gen)
    a, b, s = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight, wrapper.scaling["default"]
    want = brute_sparse_act_linear(wrapper.base_layer, x) + s * (x.double() @ a.double().T) @ b.double().T
    torch.testing.assert_close(wrapper(x).double(), want, rtol=1e-5, atol=1e-5)
    rtlynx.unsparsify(model)  # the adapter stays, on the nn.Linear again
    assert type(model.get_submodule("transformer_blocks.0.attn.to_q")) is peft.tuners.lora.Linear
    assert torch.equal(forward(model, inputs), ref)


def test_merged_adapter_then_sparsify_covers_every_layer(flux, gen):
    inputs, names, _, dense, ref = with_adapter(flux, gen, fuse=True)
    model = rtlynx.sparsify(copy.deepcopy(dense))
    assert set(rtlynx.sparse_layers(model)) == names
    with rtlynx.dense_mode(model):
        assert torch.equal(forward(model, inputs), ref)


def test_add_adapter_after_sparsify(flux, gen):
    inputs, names, sparse_err, dense, ref = with_adapter(flux, gen)
    model = rtlynx.sparsify(copy.deepcopy(flux))
    model.add_adapter(lora_config(flux))  # the dense model's names: the sparse layers keep them
    peft.set_peft_model_state_dict(model, get_peft_model_state_dict(dense))
    assert set(rtlynx.sparse_layers(model)) == names
    assert set(get_peft_model_state_dict(model)) == set(get_peft_model_state_dict(dense))  # same adapter keys
    check_against(model, ref, sparse_err, inputs, "add_adapter after sparsify")


def test_adapter_on_some_layers_leaves_the_others_bare(flux):
    model = rtlynx.sparsify(copy.deepcopy(flux))
    model.add_adapter(LoraConfig(r=2, target_modules=["transformer_blocks.0.attn.to_q"]))
    assert type(model.get_submodule("transformer_blocks.0.attn.to_q")) is SparseLoraLinear
    assert type(model.get_submodule("transformer_blocks.0.attn.to_k")) is rtlynx.SparseActLinear


def test_tail_factors_are_the_active_adapters_scaled(flux, gen):
    """The one low-rank pair the GPU kernels' LoRA tail is to take equals PEFT's own sum over the active adapters."""
    model = rtlynx.sparsify(copy.deepcopy(flux))
    for name in ("a", "b"):
        model.add_adapter(LoraConfig(r=3, lora_alpha=5, target_modules=["to_q"], init_lora_weights=False), name)
    randomize_adapter(model, gen)
    model.set_adapters(["a", "b"], [0.6, 1.3])
    wrapper = model.get_submodule("transformer_blocks.0.attn.to_q")
    x = torch.randn(7, wrapper.in_features, generator=gen)
    a, b = wrapper.tail_factors()
    assert a.shape == (6, wrapper.in_features) and b.shape == (wrapper.out_features, 6)
    with torch.no_grad():
        torch.testing.assert_close((x @ a.T) @ b.T, wrapper(x) - wrapper.base_layer(x), rtol=1e-5, atol=1e-5)
    model.disable_adapters()
    assert wrapper.tail_factors() is None


# ---------------------------------------------------------------------------------------------- pipelines
def lora_file(pipe_cls, dense_transformer, path, gen, r=4, sparse_only=False):
    """A LoRA in diffusers' format: PEFT adapter on a dense copy, written by the pipeline's save_lora_weights
    (``sparse_only``: on the layers rtlynx sparsifies only, not also on one it leaves dense)."""
    t = copy.deepcopy(dense_transformer)
    config = lora_config(t, r=r)
    if sparse_only:
        config.target_modules = rtlynx.eligible_layers(t)
    t.add_adapter(config)
    randomize_adapter(t, gen)
    pipe_cls.save_lora_weights(str(path), transformer_lora_layers=get_peft_model_state_dict(t))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flux", "qwen-image", "z-image"])
def test_pipeline_lora_calls_on_a_sparsified_pipeline(kind, tmp_path, gen):
    from rtlynx.testing import BUILDERS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense_pipe, pipe = BUILDERS[kind](), BUILDERS[kind]()  # the same transformer weights (tiny_transformer seed 0)
    base = dense_pipe.transformer
    inputs = example_inputs(base)
    names, sparse_err = plain_sparse(base, inputs)
    plain = forward(base, inputs)
    file_a = lora_file(type(dense_pipe), base, tmp_path / "a", gen)
    file_b = lora_file(type(dense_pipe), base, tmp_path / "b", gen)
    rtlynx.sparsify(pipe)
    for p in (dense_pipe, pipe):
        p.load_lora_weights(file_a, adapter_name="a")
        p.load_lora_weights(file_b, adapter_name="b")
    assert set(rtlynx.sparse_layers(pipe)) == names

    def same(what):
        check_against(pipe.transformer, forward(dense_pipe.transformer, inputs), sparse_err, inputs, what)

    same("load_lora_weights (b active)")
    for p in (dense_pipe, pipe):
        p.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    same("set_adapters with weights")
    for p in (dense_pipe, pipe):
        p.disable_lora()
    with rtlynx.dense_mode(pipe):
        assert torch.equal(forward(pipe.transformer, inputs), plain)
    for p in (dense_pipe, pipe):
        p.enable_lora()
    same("enable_lora")
    weights = {n: l.weight.detach().clone() for n, l in rtlynx.sparse_layers(pipe).items()}
    for p in (dense_pipe, pipe):
        p.fuse_lora(adapter_names=["a", "b"])
    with rtlynx.dense_mode(pipe):
        torch.testing.assert_close(forward(pipe.transformer, inputs), forward(dense_pipe.transformer, inputs),
                                   rtol=1e-5, atol=1e-5)
    for p in (dense_pipe, pipe):
        p.unfuse_lora()
    for n, layer in rtlynx.sparse_layers(pipe).items():
        torch.testing.assert_close(layer.weight, weights[n], rtol=1e-5, atol=1e-6)
    same("unfuse_lora")
    for p in (dense_pipe, pipe):
        p.delete_adapters("a")
    same("delete_adapters")
    for p in (dense_pipe, pipe):
        p.unload_lora_weights()
    assert set(rtlynx.sparse_layers(pipe)) == names
    assert not any(isinstance(m, SparseLoraLinear) for m in pipe.transformer.modules())
    with rtlynx.dense_mode(pipe):
        unloaded = forward(pipe.transformer, inputs)
    assert torch.equal(unloaded, forward(dense_pipe.transformer, inputs))
    torch.testing.assert_close(unloaded, plain, rtol=1e-5, atol=1e-5)  # the weights went through fuse / unfuse


def test_save_pretrained_refuses_in_one_line_and_rtlynx_save_skips_adapters(flux, tmp_path, gen):
    model = rtlynx.sparsify(copy.deepcopy(flux), lora_rank=2)
    with pytest.raises(ValueError, match=r"rtlynx\.unsparsify.*rtlynx\.save") as e:
        model.save_pretrained(tmp_path / "x")
    assert "\n" not in str(e.value)
    model.add_adapter(lora_config(flux))
    with pytest.warns(UserWarning, match="not your adapters"):
        rtlynx.save(model, tmp_path / "lynx")
    fresh = rtlynx.load(copy.deepcopy(flux), tmp_path / "lynx")
    assert set(rtlynx.sparse_layers(fresh)) == set(rtlynx.sparse_layers(model))
    assert not any(isinstance(m, SparseLoraLinear) for m in fresh.modules())
    rtlynx.unsparsify(model)
    model.save_pretrained(tmp_path / "plain")  # diffusers' own save again


# ---------------------------------------------------------------------------------------------- FP8 storage
def test_fuse_into_fp8_stored_weights_requantises(gen):
    from test_fp8_storage import Attn, store

    model = Attn().to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft.inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_k"], init_lora_weights=False), model)
    randomize_adapter(model, gen)
    rtlynx.sparsify(model, preset=None, include=["to_*"], dtype="fp8", lora_rank=2, speed_rules=False)
    store(model)
    wrapper = model.to_q
    base = wrapper.base_layer
    assert base.weight.dtype == torch.float8_e4m3fn

    def deq():
        return base.weight.float() * base.weight_scale.float().unsqueeze(1)

    before = deq()
    delta = wrapper.get_delta_weight("default").float()
    x = torch.randn(6, 64, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        unfused = wrapper(x).float()
    wrapper.merge()
    assert base.weight.dtype == torch.float8_e4m3fn  # re-quantised, still FP8
    # e4m3: relative half-ulp 2^-4, subnormal spacing 2^-9 of the row's scale (row max / 448); bf16 dequantised 2^-8
    step = torch.maximum(before.abs(), (before + delta).abs()).amax(1, keepdim=True) / 448 * 2 ** -9
    tol = 2 ** -4 * (before + delta).abs() + step + 2 ** -8 * before.abs()
    assert ((deq() - (before + delta)).abs() <= tol).all()
    with torch.no_grad():
        fused = wrapper(x).float()
    assert rel(fused, unfused) < 0.1  # the same layer, the adapter now inside the FP8 weights
    wrapper.unmerge()
    # back within two FP8 roundings (of before + delta, then of the result minus delta) and bf16's of the dequantised
    back = 2 ** -4 * ((before + delta).abs() + before.abs()) + 2 * step + 2 ** -8 * before.abs()
    assert ((deq() - before).abs() <= back).all()


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_hotswap_and_new_adapter_weights_do_not_recompile(tmp_path, gen):
    """diffusers' LoRA hotswap (enable_lora_hotswap, then load_lora_weights(hotswap=True) of an adapter of at most
    the declared rank) and adapter weights changed in place run the compiled sparsified transformer without a new
    graph. Counted with a backend that counts its compilations; the backend is dynamo's "eager" (recompiles are
    decided by dynamo's guards, whatever the backend; inductor would only add C++ build time on this CPU)."""
    from rtlynx.testing import BUILDERS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe, ref_pipe = BUILDERS["flux"](), BUILDERS["flux"]()
    inputs = example_inputs(pipe.transformer)
    file_a = lora_file(type(pipe), pipe.transformer, tmp_path / "a", gen, r=4)
    file_b = lora_file(type(pipe), pipe.transformer, tmp_path / "b", gen, r=2)
    rtlynx.sparsify(pipe)
    rtlynx.sparsify(ref_pipe)
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(file_a, adapter_name="style")
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(pipe.transformer, backend=counting)
    first = forward(compiled, inputs)
    assert len(graphs) == 1
    pipe.load_lora_weights(file_b, adapter_name="style", hotswap=True)
    swapped = forward(compiled, inputs)
    ref_pipe.load_lora_weights(file_b, adapter_name="style")
    # adapter b loaded the plain way, eager: equal up to fp32 rounding (the hotswapped factors are zero-padded to
    # the target rank, so the products are summed over more terms; peft 0.21 differs from it by ~4e-7)
    torch.testing.assert_close(swapped, forward(ref_pipe.transformer, inputs), rtol=1e-5, atol=1e-5)
    assert not torch.equal(swapped, first)
    wrapper = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    with torch.no_grad():
        wrapper.lora_B["style"].weight.mul_(2)
    forward(compiled, inputs)
    assert len(graphs) == 1, f"{len(graphs) - 1} recompiles"
    torch._dynamo.reset()
