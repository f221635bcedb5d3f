"""SparsityConfig.dense_below_t: the sparse layers run dense on the final (low-noise) sampling steps."""

import pytest
import torch
import torch.nn as nn

import rtlynx
from rtlynx import api, io
from conftest import brute_sparse_act_linear
from rtlynx.config import SparsityConfig

diffusers = pytest.importorskip("diffusers")
from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer  # noqa: E402


def _run(model, kind, t, positional=False, **kw):
    inp = example_inputs(model, batch=2, seed=3)
    key = "t" if kind == "z-image" else "timestep"
    inp[key] = torch.as_tensor(t, dtype=torch.float32).expand(2).clone() if not isinstance(t, list) else torch.tensor(t)
    inp.update(kw)
    if positional:  # Flux: forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)
        args = [inp.pop(k) for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")]
        return output_tensor(model(*args, **inp))
    return output_tensor(model(**inp))


def _pair(kind):
    torch.manual_seed(0)
    model = tiny_transformer(kind).eval()
    return model


@pytest.mark.parametrize("kind,late,early", [("flux", 0.2, 0.9), ("qwen-image", 0.2, 0.9),
                                             ("z-image", 0.8, 0.1)])  # Z-Image: t = 1 is the clean image
@torch.no_grad()
def test_final_steps_run_dense(kind, late, early):
    model = _pair(kind)
    dense_late, dense_early = _run(model, kind, late), _run(model, kind, early)
    rtlynx.sparsify(model, backend="reference", dense_below_t=0.5)
    assert torch.equal(_run(model, kind, late), dense_late)  # low noise: every layer dense, bit for bit
    sparse_early = _run(model, kind, early)
    assert not torch.allclose(sparse_early, dense_early, atol=1e-4)
    api.configure(model, dense_below_t=None)  # schedule off: same sparse result at the early step
    assert torch.equal(_run(model, kind, early), sparse_early)
    assert not torch.allclose(_run(model, kind, late), dense_late, atol=1e-4)


@torch.no_grad()
def test_time_read_from_positional_args_and_1000_scale():
    model = _pair("flux")
    ref = _run(model, "flux", 0.2)
    rtlynx.sparsify(model, backend="reference", dense_below_t=0.5)
    assert torch.equal(_run(model, "flux", 0.2, positional=True), ref)
    assert torch.equal(_run(model, "flux", 200.0), _run(model, "flux", 200.0 / 1000 * 1000))  # 0-1000 scale read
    gate = next(iter(api.sparse_layers(model).values()))._step_gate
    assert gate.last_t == pytest.approx(0.2) and gate.dense


@torch.no_grad()
def test_noisiest_sample_of_a_batch_decides():
    model = _pair("flux")
    rtlynx.sparsify(model, backend="reference", dense_below_t=0.5)
    _run(model, "flux", [0.1, 0.7])
    gate = next(iter(api.sparse_layers(model).values()))._step_gate
    assert gate.last_t == pytest.approx(0.7) and not gate.dense


def test_configure_validates_and_config_follows():
    model = _pair("flux")
    rtlynx.sparsify(model, backend="reference")
    assert not hasattr(model, "_rtlynx_step_hook")
    with pytest.raises(ValueError, match="dense_below_t"):
        api.configure(model, dense_below_t=1.5)
    assert rtlynx.config_of(model).dense_below_t is None and not hasattr(model, "_rtlynx_step_hook")
    assert "final steps" not in str(api.summary(model))
    api.configure(model, dense_below_t=0.25)
    assert rtlynx.config_of(model).dense_below_t == 0.25 and hasattr(model, "_rtlynx_step_hook")
    assert "t < 0.25" in str(api.summary(model))
    assert len(model._forward_pre_hooks) == 1
    api.configure(model, dense_below_t=0.3)  # replaces, never stacks hooks
    assert len(model._forward_pre_hooks) == 1
    with pytest.raises(ValueError):
        SparsityConfig(dense_below_t=0.0)


@torch.no_grad()
def test_save_load_keeps_the_schedule(tmp_path):
    model = _pair("flux")
    ref = _run(model, "flux", 0.1)
    rtlynx.sparsify(model, backend="reference", dense_below_t=0.3, lora_rank=4)
    io.save(model, tmp_path / "s")
    fresh = _pair("flux")
    io.load(fresh, tmp_path / "s")
    assert rtlynx.config_of(fresh).dense_below_t == 0.3
    assert torch.equal(_run(fresh, "flux", 0.1), ref)
    api.unsparsify(fresh)
    assert not hasattr(fresh, "_rtlynx_step_hook") and len(fresh._forward_pre_hooks) == 0


def test_model_without_time_argument_warns_and_stays_sparse():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(16, 16)])

        def forward(self, x):
            return self.blocks[0](x)

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 16)
    dense = net(x)
    rtlynx.sparsify(net, backend="reference", dense_below_t=0.5)
    with pytest.warns(RuntimeWarning, match="without a 'timestep'"):
        y = net(x)
    expect = brute_sparse_act_linear(net.blocks[0], x).float()  # sparse, by the independent reference
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expect, dense, atol=1e-4)


@pytest.mark.parametrize("kind,late,mid,early", [("flux", 0.1, 0.5, 0.9), ("z-image", 0.9, 0.5, 0.1)])
@torch.no_grad()
def test_first_and_final_steps_dense_together(kind, late, mid, early, tmp_path):
    # dense_above_t: the first (noisiest) steps dense, with or without dense_below_t; the middle stays sparse
    model = _pair(kind)
    dense = {t: _run(model, kind, t) for t in (late, mid, early)}
    rtlynx.sparsify(model, backend="reference", dense_above_t=0.7, lora_rank=4)
    assert torch.equal(_run(model, kind, early), dense[early])  # noise level 0.9 > 0.7: dense, bit for bit
    for t in (mid, late):
        assert not torch.allclose(_run(model, kind, t), dense[t], atol=1e-4)
    api.configure(model, dense_below_t=0.3)  # both ends dense now
    assert torch.equal(_run(model, kind, late), dense[late]) and torch.equal(_run(model, kind, early), dense[early])
    sparse_mid = _run(model, kind, mid)
    assert not torch.allclose(sparse_mid, dense[mid], atol=1e-4)
    assert "t > 0.7" in str(api.summary(model)) and "t < 0.3" in str(api.summary(model))
    io.save(model, tmp_path / "s")  # the schedule travels with the save
    fresh = _pair(kind)
    io.load(fresh, tmp_path / "s")
    assert (rtlynx.config_of(fresh).dense_above_t, rtlynx.config_of(fresh).dense_below_t) == (0.7, 0.3)
    assert torch.equal(_run(fresh, kind, mid), sparse_mid) and torch.equal(_run(fresh, kind, early), dense[early])
    api.configure(model, dense_above_t=None)
    assert not torch.allclose(_run(model, kind, early), dense[early], atol=1e-4)
    api.configure(model, dense_below_t=None)
    assert not hasattr(model, "_rtlynx_step_hook")  # no schedule left: no hook


def test_first_steps_schedule_is_validated():
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dense_above_t"):
            SparsityConfig(dense_above_t=bad)
    with pytest.raises(ValueError, match="must be above dense_below_t"):
        SparsityConfig(dense_below_t=0.5, dense_above_t=0.4)
    model = _pair("flux")
    rtlynx.sparsify(model, backend="reference", dense_below_t=0.5)
    with pytest.raises(ValueError, match="must be above"):
        api.configure(model, dense_above_t=0.2)
    assert rtlynx.config_of(model).dense_above_t is None  # nothing half-applied


def test_generate_options_set_both_schedules():
    from types import SimpleNamespace

    from rtlynx.commands.generate import prepare

    runner = SimpleNamespace(transformer=_pair("flux"))
    prepare(runner, None, None, 0.2, "reference", False, dense_above_t=0.6)
    cfg = rtlynx.config_of(runner.transformer)
    assert (cfg.dense_below_t, cfg.dense_above_t) == (0.2, 0.6)
    runner = SimpleNamespace(transformer=_pair("flux"))
    prepare(runner, None, None, "config", "reference", False)  # the defaults: what the preset says (no schedule)
    assert rtlynx.config_of(runner.transformer).dense_above_t is None
    with pytest.raises(ValueError, match="must be above"):
        prepare(SimpleNamespace(transformer=_pair("flux")), None, None, 0.5, "reference", False, dense_above_t=0.4)
