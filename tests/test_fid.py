"""FID/KID maths, paired PSNR/SSIM against known values, and the FID pipeline with a stand-in network."""
import numpy as np
import pytest
import torch

from rtlynx.eval import fid as F


def _ab():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    return torch.tensor(a), torch.tensor(b)


def test_ssim_matches_skimage_values():
    a, b = _ab()
    # skimage 0.26 structural_similarity(channel_axis=2, gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False, data_range=255) on these inputs
    assert F.ssim(a, b).tolist() == pytest.approx([0.9555323099224822, 0.9521776016485495], abs=1e-10)
    assert F.ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    # constant images: SSIM reduces to the luminance term (2xy + C1) / (x^2 + y^2 + C1)
    x, y = torch.full((1, 16, 16, 1), 100.0), torch.full((1, 16, 16, 1), 150.0)
    c1 = (0.01 * 255) ** 2
    assert float(F.ssim(x, y)) == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1))
    # channels-first gives the same
    assert torch.allclose(F.ssim(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2), channels_last=False), F.ssim(a, b))
    with pytest.raises(ValueError):
        F.ssim(a, b[:1])


def test_psnr_known_values():
    a, b = _ab()
    assert F.psnr(a, b).tolist() == pytest.approx([21.075888833208914, 21.143615056340263], abs=1e-9)
    x = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    assert float(F.psnr(x, x + 1)) == pytest.approx(20 * np.log10(255))  # mse 1
    with pytest.raises(ValueError):
        F.psnr(a, b[:1])


def test_fid_closed_form_and_kid():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    assert F.fid_from_features(a, a) == pytest.approx(0, abs=1e-8)
    # same covariance, mean shifted by 1 in each of 8 dims: FID = |mu1 - mu2|^2 = 8
    assert F.fid_from_features(a, a + 1) == pytest.approx(8, abs=1e-6)
    # N(0, I) vs N(0, 4I): tr(I) + tr(4I) - 2 tr(2I) = d  (up to sampling noise)
    b = rng.normal(size=(4000, 8)) * 2
    assert F.fid_from_features(a, b) == pytest.approx(8, rel=0.1)
    kid_same, _ = F.kid_from_features(a, rng.normal(size=(4000, 8)), subsets=10, subset_size=500)
    kid_diff, _ = F.kid_from_features(a, a + 1, subsets=10, subset_size=500)
    assert abs(kid_same) < 0.01 < kid_diff


def _frechet_numpy(a, b):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr (S1 S2)^1/2 = sum of sqrt(eigenvalues of S1 S2) (real and
    >= 0 for PSD S1, S2): numpy, another route than rtlynx's symmetric eigh formulation."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def test_fid_pipeline_with_standin_network(tmp_path):
    """fid_of_model end to end on CPU: tiny model, tiny data set, a TorchScript stand-in for Inception."""
    pytest.importorskip("diffusers")
    from rtlynx.data import emoji64
    from rtlynx.models.miniflux import MiniFlux, WordTokenizer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 8, stride=8)

        def forward(self, x):
            assert x.shape[1:] == (3, 299, 299)
            return self.conv(x).mean((2, 3))

    net_path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(Net().half()), str(net_path))
    F.record_sha256(net_path)  # what `rtlynx data inception` does: an unrecorded network is refused
    rng = np.random.default_rng(0)
    prompts = ["red heart, noto style", "dog face, 3d style"]
    arrays = {"images": rng.integers(0, 256, (20, 64, 64, 3), dtype=np.uint8),
              "identity": np.arange(20, dtype=np.int32) % 2, "style": np.zeros(20, np.int8),
              "category": np.zeros(20, np.int8), "prompts": np.array(prompts * 10), "names": np.array(prompts * 10),
              "codepoints": np.array(["2764"] * 20), "category_names": np.array(["Symbols"]),
              "style_names": np.array(emoji64.STYLE_NAMES),
              "meta": np.array('{"format_version": %d}' % emoji64.FORMAT_VERSION)}
    data = emoji64.save(arrays, tmp_path / "d.npz")
    model = MiniFlux({"width": 64, "head_dim": 32, "axes_dims_rope": [8, 12, 12], "num_layers": 1,
                      "num_single_layers": 1, "text_width": 32, "text_layers": 1, "text_heads": 2},
                     WordTokenizer.fit(prompts, 8)).eval()
    r = F.fid_of_model(model, data, net_path, n=6, batch_size=4, num_steps=2, progress=False, return_images=True)
    assert r["n_generated"] == 6 and r["n_reference"] == 20 and r["num_steps"] == 2
    # the FID of the features of the images it generated and of the data set's images, by an independent formula
    net = F.load_inception(net_path)
    fake = F.inception_features(net, r["images"])
    real = F.inception_features(net, emoji64.load(data)["images"])
    assert r["images"].shape == (6, 64, 64, 3)
    assert r["fid"] == pytest.approx(_frechet_numpy(fake, real), rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError):
        F.inception_features(F.load_inception(net_path), np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(FileNotFoundError):
        F.load_inception(tmp_path / "missing.pt")


def test_split_join_and_paired_metrics(tmp_path):
    p = tmp_path / "blob.bin"
    data = np.random.default_rng(0).integers(0, 256, 1001, dtype=np.uint8).tobytes()
    p.write_bytes(data)
    parts = F.split_file(p, 3)
    assert len(parts) == 3 and sum(q.stat().st_size for q in parts) == 1001
    p.unlink()
    assert F._join_parts(p).read_bytes() == data
    with pytest.raises(FileNotFoundError):
        F.load_inception(tmp_path / "nothing.pt")
    a, b = _ab()
    m = F.paired_metrics(a.numpy(), b.numpy())
    assert m["n"] == 2 and m["psnr"] == pytest.approx((21.075888833208914 + 21.143615056340263) / 2)
    assert m["ssim"] == pytest.approx((0.9555323099224822 + 0.9521776016485495) / 2)
