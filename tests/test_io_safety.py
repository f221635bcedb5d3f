"""save / load safety: field types checked before the model is touched, atomic fresh saves, a checksum that
catches damaged files and interrupted overwrites, no unrelated file replaced, only finite floating LoRA tensors."""

import hashlib
import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

import rtlynx
from rtlynx import io
from rtlynx.integrations.diffusers import tiny_transformer


def _saved(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, lora_rank=4)
    for layer in rtlynx.sparse_layers(model).values():
        layer.lora_B.data.normal_()
    return model, rtlynx.save(model, tmp_path / "lynx")


def _edit_config(path, edit):
    cfg = json.loads((path / io.CONFIG_FILE).read_text())
    edit(cfg)
    (path / io.CONFIG_FILE).write_text(json.dumps(cfg))


def _rewrite_tensors(path, tensors):
    save_file(tensors, str(path / io.LORA_FILE))
    _edit_config(path, lambda c: c.update(
        lora_sha256=hashlib.sha256((path / io.LORA_FILE).read_bytes()).hexdigest()))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    assert not rtlynx.sparse_layers(model) and not hasattr(model, "_rtlynx_settings")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _first(cfg):
    return next(iter(cfg["layers"].values()))


BAD_EDITS = {
    "layer lora_rank 4.0": lambda c: _first(c).update(lora_rank=4.0),
    "layer lora_rank '4'": lambda c: _first(c).update(lora_rank="4"),
    "layer lora_rank true": lambda c: _first(c).update(lora_rank=True),
    "layer in_features 32.0": lambda c: _first(c).update(in_features=float(_first(c)["in_features"])),
    "layer extra field": lambda c: _first(c).update(colour="red"),
    "layers a list": lambda c: c.update(layers=list(c["layers"])),
    "model_class 5": lambda c: c.update(model_class=5),
    "config lora_rank 4.0": lambda c: c["config"].update(lora_rank=4.0),
    "config include a string": lambda c: c["config"].update(include="transformer_blocks.*"),
    "config eps a string": lambda c: c["config"].update(eps="1e-8"),
    "config dense_below_t true": lambda c: c["config"].update(dense_below_t=True),
    "config n true": lambda c: c["config"].update(n=True),
    "config a list": lambda c: c.update(config=[]),
    "checksum not hex": lambda c: c.update(lora_sha256=12),
}


@pytest.mark.parametrize("case", sorted(BAD_EDITS))
def test_bad_field_types_fail_before_the_model_changes(tmp_path, case):
    _, path = _saved(tmp_path)
    _edit_config(path, BAD_EDITS[case])
    fresh = tiny_transformer("flux")
    before = _state(fresh)
    with pytest.raises(ValueError):
        rtlynx.load(fresh, path)
    _assert_untouched(fresh, before)


def test_flipped_bytes_are_detected(tmp_path):
    _, path = _saved(tmp_path)
    data = bytearray((path / io.LORA_FILE).read_bytes())
    for i in (-4, -100, -1000, -2000):  # in the data section (the header is at the start)
        data[i] ^= 0x10
    (path / io.LORA_FILE).write_bytes(bytes(data))
    fresh = tiny_transformer("flux")
    before = _state(fresh)
    with pytest.raises(ValueError, match="sha256"):
        rtlynx.load(fresh, path)
    _assert_untouched(fresh, before)


def _lora_of(model):
    return {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in rtlynx.sparse_layers(model).items()}


def _assert_lora(model, want):
    got = _lora_of(model)
    assert got.keys() == want.keys() and all(torch.equal(got[n][i], want[n][i]) for n in got for i in (0, 1))


@pytest.mark.parametrize("crash_at", [1, 2])
def test_interrupted_overwrite_keeps_the_old_save(tmp_path, monkeypatch, crash_at):
    """An exception at either rename (the commit or the tensors) rolls back: the folder holds the old save, byte for
    byte, and loads the old LoRA."""
    model_a, path = _saved(tmp_path, seed=0)
    model_b, _ = _saved(tmp_path / "b", seed=1)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_replace = os.replace
    calls = []

    def crash(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        rtlynx.save(model_b, path, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    fresh = tiny_transformer("flux")
    rtlynx.load(fresh, path)
    _assert_lora(fresh, _lora_of(model_a))


def test_killed_overwrite_after_the_commit_loads_the_new_save(tmp_path, monkeypatch):
    """A process killed between the commit and the tensor rename (no rollback runs): the config names the pending
    tensors, which load finds; the next save cleans them up."""
    _, path = _saved(tmp_path, seed=0)
    model_b, _ = _saved(tmp_path / "b", seed=1)
    real_replace = os.replace
    calls = []

    def killed(src, dst):  # every rename after the commit fails, the rollback's too: what a kill leaves
        calls.append(dst)
        if len(calls) > 1:
            raise SystemExit("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(SystemExit):
        rtlynx.save(model_b, path, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in path.glob("*.pending")]
    fresh = tiny_transformer("flux")
    rtlynx.load(fresh, path)
    _assert_lora(fresh, _lora_of(model_b))
    rtlynx.save(model_b, path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == [io.CONFIG_FILE, io.LORA_FILE]


def test_fresh_save_is_all_or_nothing(tmp_path, monkeypatch):
    model, _ = _saved(tmp_path / "first")
    target = tmp_path / "new" / "lynx"

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io.Path, "write_text", fail)
    with pytest.raises(OSError, match="disk full"):
        rtlynx.save(model, target)
    monkeypatch.undo()
    assert not target.exists() and list(target.parent.iterdir()) == []  # no directory, no temporary left
    rtlynx.save(model, target)
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & 0o055, oct(mode)  # the usual permissions, not mkdtemp's 0700
    assert sorted(p.name for p in target.iterdir()) == [io.CONFIG_FILE, io.LORA_FILE]


def test_save_refuses_an_unrelated_lora_file(tmp_path):
    model, _ = _saved(tmp_path / "a")
    target = tmp_path / "mine"
    target.mkdir()
    (target / io.LORA_FILE).write_bytes(b"someone else's tensors")
    with pytest.raises(FileExistsError, match=io.LORA_FILE):
        rtlynx.save(model, target)
    assert (target / io.LORA_FILE).read_bytes() == b"someone else's tensors"
    assert not (target / io.CONFIG_FILE).exists()


def test_save_refuses_non_finite_lora(tmp_path):
    model, _ = _saved(tmp_path / "a")
    layer = next(iter(rtlynx.sparse_layers(model).values()))
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        rtlynx.save(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("bad", ["nan", "int"])
def test_load_refuses_non_finite_or_integer_tensors(tmp_path, bad):
    from safetensors.torch import load_file

    _, path = _saved(tmp_path)
    t = load_file(str(path / io.LORA_FILE))
    key = next(k for k in t if k.endswith("lora_A"))
    if bad == "nan":
        t[key][0, 0] = float("nan")
    else:
        t[key] = t[key].to(torch.int32)
    _rewrite_tensors(path, t)
    fresh = tiny_transformer("flux")
    before = _state(fresh)
    with pytest.raises(ValueError, match="NaN or Inf" if bad == "nan" else "must be one of"):
        rtlynx.load(fresh, path)
    _assert_untouched(fresh, before)


def test_save_without_checksum_loads_with_a_warning(tmp_path):
    model, path = _saved(tmp_path)
    _edit_config(path, lambda c: c.pop("lora_sha256"))
    fresh = tiny_transformer("flux")
    with pytest.warns(RuntimeWarning, match="no checksum"):
        rtlynx.load(fresh, path)
    a = next(iter(rtlynx.sparse_layers(model).values())).lora_B
    assert torch.equal(next(iter(rtlynx.sparse_layers(fresh).values())).lora_B, a)


def test_shipped_lora_verifies():
    from pathlib import Path

    import warnings

    asset = Path(rtlynx.__file__).parent / "assets" / "miniflux-lynx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksum is recorded: no warning
        meta, tensors = io.read(asset)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
