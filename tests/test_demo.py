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
    model = SlowFirstCall()
    res = demo.generate_variants(model, ["a", "b"], ["dense", "act24"], progress=False)
    # every variant's timed run costs 0.01 s per image; the 0.5 s start-up must not land in the dense column
    for name in ("dense", "act24"):
        assert 0.01 <= res[name][1] < 0.1, (name, res[name][1])


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
