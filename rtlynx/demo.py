"""The five-variant comparison on the shipped mini-FLUX: dense, naive weight 2:4, naive activation
2:4, activation 2:4 + norm, RT-Lynx (norm + LoRA); same prompts, seeds and noise for every variant."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import api, io
from .eval import fid
from .models.miniflux import to_uint8

LORA_DIR = Path(__file__).resolve().parent / "assets" / "miniflux-lynx"

DEMO_PROMPTS = [
    "grinning face, noto style", "red heart, twemoji style", "dog face, 3d style", "fire, noto style",
    "rocket, twemoji style", "thumbs up, 3d style", "smiling face with sunglasses, twemoji style",
    "cat face, noto style",
]

WARMUP_STEPS = 2  # untimed sampling steps per variant before its timed run

# name -> (label, configure() arguments)
VARIANTS = {
    "dense": ("dense", dict(mode="dense")),
    "weight24": ("weight 2:4", dict(mode="weight")),
    "act24": ("act 2:4", dict(mode="sparse", compensation="none", lora=False)),
    "act24_norm": ("act 2:4 + norm", dict(mode="sparse", compensation="norm", lora=False)),
    "rtlynx": ("RT-Lynx", dict(mode="sparse", compensation="norm", lora=True)),
}


def variant_settings(settings: dict, centre: str | None) -> dict:
    """configure() arguments of a variant: the baselines (weight 2:4, activation 2:4, + norm) prune x itself, as the
    paper's naive methods do; variants with the LoRA keep ``centre``, the setting the loaded LoRA was fitted with."""
    return {**settings, "centre": centre if settings.get("lora") else None}


def prepare(model, lora_dir: Path | None = LORA_DIR, backend: str = "auto", required: bool = False) -> bool:
    """Sparsify ``model.transformer`` for the comparison; load the distilled LoRA when there is one (``required``:
    a folder the user named must hold one). Returns whether a LoRA was loaded."""
    if required or (lora_dir is not None and (Path(lora_dir) / io.CONFIG_FILE).is_file()):
        io.load(model.transformer, lora_dir)
        api.configure(model.transformer, backend=backend, speed_rules=False)  # a quality demo: sparse everywhere
        return True
    api.sparsify(model.transformer, backend=backend, speed_rules=False)
    return False


def generate_variants(model, prompts, variants, seed: int = 0, num_steps: int | None = None,
                      guidance_scale: float | None = None, progress: bool = True) -> dict:
    """name -> (images uint8 [B,H,W,3], seconds per image). One shared start noise for all variants. Each variant
    first samples one prompt for WARMUP_STEPS untimed, so its seconds per image leave out one-time costs (the
    first forward's allocations and library loads, lazily prepared weights)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), model.grid ** 2, model.config["patch_size"] ** 2 * model.config["channels"],
                        generator=g)
    out = {}
    cfg = api.config_of(model.transformer)
    centre = cfg.centre if cfg is not None else None  # the loaded LoRA's (variant_settings)
    bar = tqdm(variants, desc="variants", disable=not progress, unit="variant")
    for name in bar:
        bar.set_postfix_str(VARIANTS[name][0])
        api.configure(model.transformer, **variant_settings(VARIANTS[name][1], centre))
        model.sample(list(prompts[:1]), num_steps=WARMUP_STEPS, guidance_scale=guidance_scale, noise=noise[:1],
                     progress=f"{name} warm-up" if progress else False)
        if model.img_ids.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        imgs = model.sample(list(prompts), num_steps=num_steps, guidance_scale=guidance_scale, noise=noise,
                            progress=name if progress else False)
        if model.img_ids.is_cuda:
            torch.cuda.synchronize()
        out[name] = (to_uint8(imgs).cpu(), (time.perf_counter() - t0) / len(prompts))
    api.configure(model.transformer, mode="sparse", compensation="norm", lora=True, centre=centre)
    return out


def paired_metrics(results: dict) -> dict:
    """PSNR / SSIM of every variant against the dense images (same prompts, seeds, noise)."""
    dense = results["dense"][0]
    metrics = {}
    for name, (imgs, spi) in results.items():
        m = {"seconds_per_image": spi}
        if name != "dense":
            p = fid.paired_metrics(imgs, dense)
            m.update(psnr=p["psnr"], ssim=p["ssim"])
        metrics[name] = m
    return metrics


def sheet(results: dict, prompts, path: Path, title: str = "", labels: dict | None = None) -> Path:
    """Rows = prompts, columns = variants, as a PNG. ``labels``: column titles of variants that are not in
    ``VARIANTS`` (default: the variant's name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(prompts), len(names), figsize=(1.6 * len(names) + 1.8, 1.6 * len(prompts)),
                             squeeze=False)
    for j, name in enumerate(names):
        for i in range(len(prompts)):
            ax = axes[i][j]
            ax.imshow(results[name][0][i].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(VARIANTS[name][0] if name in VARIANTS else (labels or {}).get(name, name), fontsize=9)
            if j == 0:
                ax.set_ylabel(prompts[i].replace(", ", ",\n"), fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fresh_dir(path: Path, overwrite: bool) -> Path:
    """``path`` if it is free (or overwrite is allowed), else the first free ``path-2``, ``path-3``..."""
    path = Path(path)
    if overwrite or not path.exists() or not any(path.iterdir()):
        return path
    i = 2
    while Path(f"{path}-{i}").exists():
        i += 1
    return Path(f"{path}-{i}")


def table(metrics: dict) -> str:
    lines = [f"{'variant':16s} {'PSNR vs dense':>14s} {'SSIM vs dense':>14s} {'s / image':>10s}"]
    for name, m in metrics.items():
        p = f"{m['psnr']:.2f} dB" if "psnr" in m else "-"
        s = f"{m['ssim']:.4f}" if "ssim" in m else "-"
        lines.append(f"{VARIANTS[name][0]:16s} {p:>14s} {s:>14s} {m['seconds_per_image']:10.3f}")
    return "\n".join(lines)
