"""The library-side repros of issue 22 (a hostile-input review): each ends in a one-line error or a warning, with the
model and the files on disk as they were."""

import json
import os
import pickle
import stat
import warnings

import pytest
import torch

import rtlynx
from rtlynx import io
from rtlynx.config import SparsityConfig
from rtlynx.integrations.diffusers import example_inputs, tiny_transformer


def _out(model, seed=0):
    with torch.no_grad():
        return model(**example_inputs(model, seed=seed))[0]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _save_with_lora(tmp_path, value=None, **kw):
    torch.manual_seed(0)
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, lora_rank=4, **kw)
    for layer in rtlynx.sparse_layers(model).values():
        layer.lora_B.data.normal_()
    if value is not None:
        next(iter(rtlynx.sparse_layers(model).values())).lora_B.data[0, 0] = value
    return model, rtlynx.save(model, tmp_path / "lynx")


# 1. finite in the file, Inf in the model's dtype
def test_load_refuses_values_beyond_the_model_dtype(tmp_path):
    _, path = _save_with_lora(tmp_path, value=1e6)  # fine in float32, beyond float16's 65504
    fresh = tiny_transformer("flux").half()
    before = _state(fresh)
    with pytest.raises(ValueError, match="beyond the largest float16"):
        rtlynx.load(fresh, path)
    assert not rtlynx.sparse_layers(fresh) and _same_state(fresh, before)
    rtlynx.load(tiny_transformer("flux"), path)  # a float32 model holds it


# 2. a sparsified model pickles (the GELU producer's forward is no bound method looked up by name)
@pytest.mark.parametrize("kind", ["flux", "qwen-image"])
def test_sparsified_model_pickles(kind):
    model = tiny_transformer(kind)
    rtlynx.sparsify(model)
    want = _out(model)
    assert any(s.producer == "gelu" for s in rtlynx.sites.model_sites(model))  # the case that failed
    copy = pickle.loads(pickle.dumps(model))
    assert torch.equal(_out(copy), want)
    buf = __import__("io").BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(_out(torch.load(buf, weights_only=False)), want)


# 3. sparsify is all or nothing
def test_sparsify_failing_midway_leaves_the_model_dense(monkeypatch):
    model = tiny_transformer("flux")
    want, before = _out(model), _state(model)
    real_init, calls = rtlynx.SparseActLinear.__init__, []

    def fail_late(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise torch.cuda.OutOfMemoryError("injected: out of memory in the 5th layer")
        real_init(self, *a, **k)

    monkeypatch.setattr(rtlynx.SparseActLinear, "__init__", fail_late)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        rtlynx.sparsify(model)
    monkeypatch.undo()
    assert not rtlynx.sparse_layers(model) and not hasattr(model, "_rtlynx_settings")
    assert _same_state(model, before) and torch.equal(_out(model), want)
    rtlynx.sparsify(model)  # and it can be sparsified again
    assert rtlynx.sparse_layers(model)


# 7. an existing empty folder is written into, never replaced
def test_save_into_an_empty_folder_keeps_the_folder(tmp_path):
    model, _ = _save_with_lora(tmp_path / "a")
    target = tmp_path / "mount"
    target.mkdir()
    target.chmod(0o751)
    inode = target.stat().st_ino
    rtlynx.save(model, target)
    assert target.stat().st_ino == inode and stat.S_IMODE(target.stat().st_mode) == 0o751
    link = tmp_path / "link"
    (tmp_path / "real").mkdir()
    link.symlink_to(tmp_path / "real")
    rtlynx.save(model, link)
    assert link.is_symlink() and (tmp_path / "real" / io.CONFIG_FILE).is_file()


# 8. a model on the meta device
def test_load_into_a_meta_model_is_refused(tmp_path):
    _, path = _save_with_lora(tmp_path)
    with torch.device("meta"):
        meta_model = tiny_transformer("flux")
    with pytest.raises(ValueError, match="meta device"):
        rtlynx.load(meta_model, path)
    assert not rtlynx.sparse_layers(meta_model)


# 10. the smaller gaps
def test_eps_must_be_finite():
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        SparsityConfig(eps=float("inf"))


def test_lora_rank_above_the_layer_is_refused(tmp_path):
    model = tiny_transformer("flux")
    before = _state(model)
    with pytest.raises(ValueError, match=r"exceeds min\(K, N\)"):
        rtlynx.sparsify(model, lora_rank=100_000)
    assert not rtlynx.sparse_layers(model) and _same_state(model, before)
    _, path = _save_with_lora(tmp_path)
    cfg = json.loads((path / io.CONFIG_FILE).read_text())
    next(iter(cfg["layers"].values()))["lora_rank"] = 100_000  # a hand-written layer table
    (path / io.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"exceeds min\(K, N\)"):
        rtlynx.load(tiny_transformer("flux"), path)


def test_unknown_preset_refused_by_a_sparsified_model(tmp_path):
    model, path = _save_with_lora(tmp_path)
    cfg = json.loads((path / io.CONFIG_FILE).read_text())
    cfg["config"]["preset"] = "no-such-preset"
    (path / io.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown preset"):
        rtlynx.load(model, path)
    assert rtlynx.config_of(model).preset == "auto"


def test_fuse_sites_mismatch_refused(tmp_path):
    model, path = _save_with_lora(tmp_path)
    unfused, _ = _save_with_lora(tmp_path / "u", fuse_sites=False)
    with pytest.raises(ValueError, match="fuse_sites"):
        rtlynx.load(unfused, path)
    assert rtlynx.config_of(unfused).fuse_sites is False


def test_layers_outside_the_blocks_warn(tmp_path):
    model = tiny_transformer("flux")
    with pytest.warns(RuntimeWarning, match="outside the transformer blocks"):
        rtlynx.sparsify(model, preset=None, include=["*"])
    assert "x_embedder" in rtlynx.sparse_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rtlynx.sparsify(tiny_transformer("flux"))  # the presets stay inside the blocks


def test_deeply_nested_config_is_one_line_error(tmp_path):
    _, path = _save_with_lora(tmp_path)
    (path / io.CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        rtlynx.load(tiny_transformer("flux"), path)


def test_lora_sha_must_be_hex(tmp_path):
    """The checksum also names the pending tensors file: no path may hide in it."""
    _, path = _save_with_lora(tmp_path)
    cfg = json.loads((path / io.CONFIG_FILE).read_text())
    cfg["lora_sha256"] = ("../" * 22)[:64]
    (path / io.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sha256 hex digest"):
        rtlynx.load(tiny_transformer("flux"), path)
    assert os.listdir(path)
