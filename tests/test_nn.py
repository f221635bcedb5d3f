import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import brute_mask
from rtlynx import SparseActLinear
from rtlynx import reference as R


def make(k=32, n_out=24, bias=True, gen=None, **kw):
    lin = nn.Linear(k, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, k, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=gen))
    return lin, SparseActLinear(lin, **kw)


def expected(x, lin, n=2, m=4, norm=True, a=None, b=None):
    """Independent float64 spec of the layer."""
    xd = x.double()
    xp = xd * brute_mask(x, n, m)
    y = xp @ lin.weight.double().T
    if norm:
        y = y * (xd.pow(2).sum(-1, keepdim=True) / (xp.pow(2).sum(-1, keepdim=True) + 1e-8)).sqrt()
    if lin.bias is not None:
        y = y + lin.bias.double()
    if a is not None:
        y = y + (xd @ a.double().T) @ b.double().T
    return y


def test_shares_parameters_and_state_dict_keys(gen):
    lin, layer = make(gen=gen)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    sd = lin.state_dict()
    layer.load_state_dict(sd)  # original keys load strictly (no LoRA)
    _, with_lora = make(gen=gen, lora_rank=4)
    missing, unexpected = with_lora.load_state_dict(sd, strict=False)
    assert set(missing) == {"lora_A", "lora_B"} and not unexpected


@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3), (2, 1, 5)])
@pytest.mark.parametrize("norm", [True, False])
def test_forward_matches_spec(lead, norm, gen):
    lin, layer = make(gen=gen, compensation="norm" if norm else "none")
    x = torch.randn(*lead, 32, generator=gen)
    y = layer(x)
    assert y.shape == (*lead, 24)
    torch.testing.assert_close(y.double(), expected(x, lin, norm=norm), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,m", [(1, 4), (4, 8), (8, 16)])
def test_other_patterns(n, m, gen):
    lin, layer = make(k=64, gen=gen, n=n, m=m)
    x = torch.randn(5, 64, generator=gen)
    torch.testing.assert_close(layer(x).double(), expected(x, lin, n, m), rtol=1e-4, atol=1e-4)


def test_fresh_lora_equals_norm_compensated_and_trained_lora_adds(gen):
    lin, layer = make(gen=gen, lora_rank=8)
    x = torch.randn(6, 32, generator=gen)
    assert layer.lora_A.shape == (8, 32) and layer.lora_B.shape == (24, 8)
    torch.testing.assert_close(layer(x).double(), expected(x, lin), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    torch.testing.assert_close(layer(x).double(), expected(x, lin, a=layer.lora_A, b=layer.lora_B), rtol=1e-4, atol=1e-4)
    layer.lora_enabled = False
    torch.testing.assert_close(layer(x).double(), expected(x, lin), rtol=1e-4, atol=1e-4)


def test_lora_trains_with_frozen_base(gen):
    lin, layer = make(gen=gen, lora_rank=4)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(16, 32, generator=gen)
    target = lin(x).detach()
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    first = None
    for _ in range(60):
        loss = F.mse_loss(layer(x), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert layer.weight.grad is None


def test_dense_and_weight_modes(gen):
    lin, layer = make(gen=gen)
    x = torch.randn(4, 32, generator=gen)
    layer.mode = "dense"
    assert torch.equal(layer(x), lin(x))
    layer.mode = "weight"
    assert torch.equal(layer(x), F.linear(x, R.prune_nm(lin.weight.detach()), lin.bias))
    with torch.no_grad():  # the cached pruned weight follows in-place updates
        lin.weight.mul_(2)
    assert torch.equal(layer(x), F.linear(x, R.prune_nm(lin.weight.detach()), lin.bias))


def test_bf16_input(gen):
    lin, layer = make(gen=gen)
    lin.to(torch.bfloat16)
    x = torch.randn(3, 32, generator=gen).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected(x, lin), rtol=3e-2, atol=3e-2)


def test_k_not_multiple_of_m_pad_and_dense(gen):
    lin, layer = make(k=30, gen=gen)
    x = torch.randn(5, 30, generator=gen)
    with pytest.warns(RuntimeWarning, match="zero-padding"):
        y = layer(x)
    xp = F.pad(x, (0, 2))
    lin_p = nn.Linear(32, 24)
    with torch.no_grad():
        lin_p.weight.copy_(F.pad(lin.weight, (0, 2)))
        lin_p.bias.copy_(lin.bias)
    torch.testing.assert_close(y.double(), expected(xp, lin_p), rtol=1e-4, atol=1e-4)
    layer.k_remainder = "dense"
    with pytest.warns(RuntimeWarning, match="dense"):
        assert torch.equal(layer(x), lin(x))


def test_bad_inputs(gen):
    lin, layer = make(gen=gen)
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(2, 31))
    with pytest.raises(ValueError):
        SparseActLinear(lin, n=4, m=4)
    with pytest.raises(ValueError):
        SparseActLinear(lin, backend="tensorrt")
    with pytest.raises(TypeError):
        SparseActLinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="mode"):
        layer.mode = "half-sparse"
    with pytest.raises(ValueError, match="compensation"):
        layer.compensation = "var"
    assert layer.mode == "sparse" and layer.compensation == "norm"  # a refused value changes nothing


def test_nan_inf_propagate_without_crash(gen):
    lin, layer = make(gen=gen)
    x = torch.randn(4, 32, generator=gen)
    x[1, 5] = float("nan")
    x[2, 9] = float("inf")
    y = layer(x)
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


def test_unavailable_backend_falls_back_with_one_warning(gen):
    lin, layer = make(gen=gen, backend="cusparselt")
    x = torch.randn(4, 32, generator=gen)
    with pytest.warns(RuntimeWarning, match="cusparselt"):
        y = layer(x)
    torch.testing.assert_close(y.double(), expected(x, lin), rtol=1e-4, atol=1e-4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # second call: no new warning


def test_to_linear_roundtrip(gen):
    lin, layer = make(gen=gen, lora_rank=2)
    back = layer.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight and back.bias is lin.bias
    x = torch.randn(3, 32, generator=gen)
    assert torch.equal(back(x), lin(x))
    assert "pattern=2:4" in repr(layer)


def test_sparse_layer_compiles_without_graph_breaks():
    # The backend dispatch must not break the graph at every layer (status checks are compile-time
    # constants); on a CPU "auto" goes straight to the reference path.
    from rtlynx import SparseActLinear

    torch.manual_seed(0)
    layer = SparseActLinear(torch.nn.Linear(64, 32), lora_rank=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 64)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x))
