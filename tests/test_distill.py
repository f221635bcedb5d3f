"""Closed-form LoRA distillation: the statistics are exact, the solution is the optimum of the
per-layer MSE, and the CLI / demo run end to end on a tiny MiniFlux."""

import json

import pytest
import torch
import torch.nn as nn

import rtlynx
from rtlynx import distill
from rtlynx import reference as R


def outlier_inputs(gen, rows=2048, k=64):
    x = torch.randn(rows, k, generator=gen) * 0.3
    x[:, :4] += torch.randn(rows, 4, generator=gen) * 3  # a few large channels, like DiT activations
    return x


def layer_with_stats(gen, k=64, n_out=48, chunks=4):
    lin = nn.Linear(k, n_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, k, generator=gen) / k ** 0.5)
    layer = rtlynx.SparseActLinear(lin)
    x = outlier_inputs(gen, k=k)
    s = distill.LayerStats.empty(k, n_out)
    for part in x.chunk(chunks):  # streaming in pieces == all at once
        s.add(part, layer)
    return layer, x, s


def direct_error(layer, x):
    with torch.no_grad():
        dense = nn.functional.linear(x, layer.weight)
        return float((layer(x) - layer.bias - dense).norm() / dense.norm())


def test_stats_are_exact_sums(gen):
    layer, x, s = layer_with_stats(gen)
    torch.testing.assert_close(s.xtx.double(), (x.T @ x).double(), rtol=1e-5, atol=1e-3)
    assert s.rows == x.shape[0]
    assert distill.residual_error(s) == pytest.approx(direct_error(layer, x), rel=1e-4)


def test_closed_form_lora_is_the_optimum(gen):
    layer, x, s = layer_with_stats(gen)
    before = distill.residual_error(s)
    a, b = distill.solve_lora(s, rank=8, ridge=0.0)
    predicted = distill.residual_error(s, a, b)
    layer.add_lora(8)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    assert predicted == pytest.approx(direct_error(layer, x), rel=1e-3)  # the formula is the real error
    assert predicted < before
    # Optimality: independent reduced-rank regression on the raw data gives the same error...
    xd, wd = x.double(), layer.weight.detach().double()
    r = nn.functional.linear(xd, wd) - nn.functional.linear(R.prune_nm(xd), wd) * R.norm_scale(x).double()[:, None]
    m = torch.linalg.lstsq(xd, r).solution
    _, _, vh = torch.linalg.svd(xd @ m, full_matrices=False)
    m8 = m @ vh[:8].T @ vh[:8]
    y = nn.functional.linear(xd, wd)
    rrr = float((r - xd @ m8).norm() / y.norm())
    assert predicted == pytest.approx(rrr, rel=1e-3)
    # ...and gradient descent from a random start does not beat it.
    a2 = torch.randn(8, 64, dtype=torch.float64, generator=gen).requires_grad_()
    b2 = torch.zeros(48, 8, dtype=torch.float64).requires_grad_()
    opt = torch.optim.Adam([a2, b2], lr=1e-2)
    for _ in range(300):
        loss = (r - xd @ a2.T @ b2.T).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach().sqrt() / y.norm()) >= predicted * (1 - 1e-3)
    # Full rank = ordinary least squares.
    af, bf = distill.solve_lora(s, rank=64, ridge=0.0)
    assert distill.residual_error(s, af, bf) == pytest.approx(float((r - xd @ m).norm() / y.norm()), rel=1e-3)


def test_stats_save_load_roundtrip_and_errors(tmp_path, gen):
    _, _, s = layer_with_stats(gen)
    stats = distill.CalibStats({"blocks.0.fc": s}, {"prompts_done": 3})
    p = stats.save(tmp_path / "c.safetensors")
    with pytest.raises(FileExistsError):
        stats.save(p)
    back = distill.CalibStats.load(p)
    assert back.meta == {"prompts_done": 3}
    t = back.layers["blocks.0.fc"]
    assert torch.equal(t.xtx, s.xtx) and t.rr == s.rr and t.rows == s.rows
    with pytest.raises(FileNotFoundError):
        distill.CalibStats.load(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"12345678garbage")
    with pytest.raises(Exception):
        distill.CalibStats.load(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    from rtlynx.testing import save_tiny_miniflux

    return save_tiny_miniflux(tmp_path_factory.mktemp("miniflux"))


def test_calibrate_train_lora_demo_cli(tiny_model_dir, tmp_path):
    from rtlynx.cli import main

    calib = tmp_path / "calib.safetensors"
    common = ["--model-dir", str(tiny_model_dir), "--device", "cpu"]
    assert main(["calibrate", *common, "--prompts-file", str(tiny_model_dir / "prompts.txt"), "--num-prompts", "4",
                 "--batch-size", "2", "--steps", "2", "--out", str(calib)]) == 0
    stats = distill.CalibStats.load(calib)
    assert stats.meta["prompts_done"] == 4 and all(s.rows > 0 for s in stats.layers.values())
    with pytest.raises(SystemExit, match="exists"):
        main(["calibrate", *common, "--prompts-file", str(tiny_model_dir / "prompts.txt"), "--out", str(calib)])
    lynx = tmp_path / "lynx"
    assert main(["train-lora", *common, "--calib", str(calib), "--rank", "4", "--out", str(lynx)]) == 0
    report = json.loads((lynx / "distill_report.json").read_text())
    assert all(r["err_lora"] < r["err_norm"] for r in report["layers"])
    demo_out = tmp_path / "demo"
    assert main(["demo", *common, "--lora-dir", str(lynx), "--out", str(demo_out), "--steps", "2",
                 "--prompt", "red heart, twemoji style", "--prompt", "fire, noto style"]) == 0
    metrics = json.loads((demo_out / "metrics.json").read_text())
    assert list(metrics["variants"]) == ["dense", "weight24", "act24", "act24_norm", "rtlynx"]
    for name, m in metrics["variants"].items():
        assert m["seconds_per_image"] > 0
        if name != "dense":
            assert 0 < m["psnr"] < 100 and -1 <= m["ssim"] <= 1
    assert (demo_out / "sheet.png").read_bytes()[:4] == b"\x89PNG"
    # A second run never overwrites the first.
    assert main(["demo", *common, "--lora-dir", str(lynx), "--out", str(demo_out), "--steps", "1",
                 "--prompt", "fire, noto style"]) == 0
    assert (tmp_path / "demo-2" / "metrics.json").is_file()
    assert json.loads((demo_out / "metrics.json").read_text()) == metrics


def test_shipped_lora_loads_into_shipped_model():
    pytest.importorskip("diffusers")
    from rtlynx import demo
    from rtlynx.models.miniflux import load_miniflux

    model = load_miniflux()
    paper = rtlynx.eligible_layers(model.transformer)
    assert demo.prepare(model)  # the distilled LoRA ships with the package
    layers = rtlynx.sparse_layers(model.transformer)
    assert len(layers) == 60 and all(l.lora_rank == 8 for l in layers.values())
    assert sorted(layers) == sorted(paper)  # exactly the paper preset
    assert all(l.lora_B.abs().sum() > 0 for l in layers.values())  # trained, not the zero init
