import pytest
import torch

from rtlynx import analysis
from rtlynx.integrations.diffusers import example_inputs, tiny_transformer


def test_analyze_tiny_flux_writes_csv_and_png(tmp_path):
    model = tiny_transformer("flux")
    rows = analysis.analyze(model, [example_inputs(model, seed=s) for s in range(2)], progress=False)
    import rtlynx

    assert [r["layer"] for r in rows] == rtlynx.eligible_layers(model, rtlynx.SparsityConfig(preset="flux-all"))
    for r in rows:
        for v in analysis.VARIANTS:
            assert 0 < r[v] < 1.5
        assert 0.5 < r["energy_kept"] <= 1
        assert r["tokens"] > 2
    csv_path = analysis.write_csv(rows, tmp_path / "e.csv")
    assert csv_path.read_text().splitlines()[0].startswith("layer,K,N,weight_magnitude")
    png = analysis.plot(rows, tmp_path / "e.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean relative output error" in analysis.report(rows)


def test_layer_errors_on_outlier_activations(gen):
    # A few large channels per token (what DiTs show): activation pruning loses far less than weight pruning.
    k = 256
    x = torch.randn(512, k, generator=gen) * 0.1
    x[:, torch.randperm(k, generator=gen)[:16]] += torch.randn(512, 16, generator=gen) * 5
    w = torch.randn(128, k, generator=gen) / k ** 0.5
    e = analysis.layer_errors(x, w)
    assert e["act"] < 0.5 * e["weight_magnitude"]
    assert e["act_norm"] <= e["act"] + 1e-6 or e["act_norm"] < e["weight_magnitude"]
    assert e["outlier_channels"] == 16
    assert e["energy_kept"] > 0.9
    # Uniform Gaussian activations: no outliers, both lose about the same.
    g = analysis.layer_errors(torch.randn(512, k, generator=gen), w)
    assert g["outlier_channels"] == 0
    assert g["act"] == pytest.approx(g["weight_magnitude"], rel=0.25)
