"""rtlynx.demo: timing excludes start-up costs; README's demo numbers come from the file the demo wrote."""

import json
import re
import time
from pathlib import Path

import torch

from rtlynx import demo

ROOT = Path(__file__).resolve().parents[1]


class SlowFirstCall:
    """Stands in for MiniFlux: the first sample() pays a one-time cost (as the first forward does)."""

    grid, config = 2, {"patch_size": 1, "channels": 1}
    img_ids = torch.zeros(1)
    transformer = None

    def __init__(self, first_s=0.5, per_image_s=0.01):
        self.calls, self.first_s, self.per_image_s = 0, first_s, per_image_s

    def sample(self, prompts, num_steps=None, guidance_scale=None, noise=None, progress=False):
        self.calls += 1
        time.sleep((self.first_s if self.calls == 1 else 0) + self.per_image_s * len(prompts))
        return torch.zeros(len(prompts), 3, 2, 2)


def test_seconds_per_image_leave_out_start_up(monkeypatch):
    monkeypatch.setattr(demo.api, "configure", lambda *a, **k: None)
    monkeypatch.setattr(demo.api, "config_of", lambda m: None)
    model = SlowFirstCall()
    res = demo.generate_variants(model, ["a", "b"], ["dense", "act24"], progress=False)
    # every variant's timed run costs 0.01 s per image; the 0.5 s start-up must not land in the dense column
    for name in ("dense", "act24"):
        assert 0.01 <= res[name][1] < 0.1, (name, res[name][1])


def test_baselines_prune_x_itself_and_rtlynx_keeps_the_loras_centring(monkeypatch):
    """With a centred LoRA loaded, the naive baselines (weight / activation 2:4, + norm) run uncentred, the variants
    with the LoRA centred, and the model is left as loaded (centred, LoRA on)."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(demo.api, "configure", lambda m, **k: calls.append(k))
    monkeypatch.setattr(demo.api, "config_of", lambda m: SimpleNamespace(centre="token_mean"))
    names = ["dense", "weight24", "act24", "act24_norm", "rtlynx"]
    demo.generate_variants(SlowFirstCall(0, 0), ["a"], names, progress=False)
    got = {n: k["centre"] for n, k in zip(names, calls)}
    assert got == {"dense": None, "weight24": None, "act24": None, "act24_norm": None, "rtlynx": "token_mean"}
    assert calls[-1] == dict(mode="sparse", compensation="norm", lora=True, centre="token_mean")
    assert demo.variant_settings({"lora": True, "mode": "sparse"}, None)["centre"] is None


def test_demo_says_what_it_loads_before_the_slow_start(monkeypatch, capsys, tmp_path):
    import pytest

    from rtlynx.cli import main
    from rtlynx.models import miniflux

    def load(*a, **k):
        assert "loading the mini-FLUX" in capsys.readouterr().out  # printed before the load starts
        raise FileNotFoundError("no model here")

    monkeypatch.setattr(miniflux, "load_miniflux", load)
    with pytest.raises(SystemExit, match="no model here"):
        main(["demo", "--device", "cpu", "--out", str(tmp_path / "d")])


def test_readme_demo_numbers_come_from_the_files_the_demo_wrote():
    """README's demo PSNRs are the ones in docs/demo_metrics_cpu*.json (written by `rtlynx demo`, copied there)."""
    text = " ".join((ROOT / "README.md").read_text().split())
    order = ("weight24", "act24", "act24_norm", "rtlynx")
    m = re.search(r"weight 2:4 ([\d.]+) dB, activation 2:4 ([\d.]+) dB, \+ norm ([\d.]+) dB, RT-Lynx ([\d.]+) dB", text)
    e = re.search(r"every step sparse \(`--dense-below-t none`\) ([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+) dB", text)
    assert m and e, "README's demo sentence changed: update this test with it"
    for found, name in ((m, "demo_metrics_cpu.json"), (e, "demo_metrics_cpu_every_step.json")):
        doc = json.loads((ROOT / "docs" / name).read_text())
        assert doc["device"] == "cpu" and doc["command"].startswith("rtlynx demo") and doc["commit"] != "unknown"
        want = [f"{doc['variants'][v]['psnr']:.2f}" for v in order]
        assert list(found.groups()) == want, (name, found.groups(), want)
    assert json.loads((ROOT / "docs" / "demo_metrics_cpu_every_step.json").read_text())["dense_below_t"] is None
