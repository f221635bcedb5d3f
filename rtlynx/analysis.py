"""Per-layer error analysis: how much each N:M variant changes each layer's output on real inputs.

For every sparsifiable layer, on the inputs it sees during a dense forward:
    err = |Y - Y~| / |Y|  with Y = X W^T (bias left out: it cancels in the difference)
for weight N:M (magnitude, Wanda), activation N:M, and activation N:M + norm scale; plus activation
statistics (energy kept by top-n-of-m, outlier channels). The paper's motivation figure: activations
lose far less than weights.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from .api import _as_module, dense_mode, eligible_layers
from .config import SparsityConfig
from .presets import PRESETS, resolve_preset

VARIANTS = ("weight_magnitude", "weight_wanda", "act", "act_norm")
LABELS = {"weight_magnitude": "weight N:M (magnitude)", "weight_wanda": "weight N:M (Wanda)",
          "act": "activation N:M", "act_norm": "activation N:M + norm"}
OUTLIER_FACTOR = 6.0  # a channel is an outlier when its RMS exceeds this times the median channel RMS


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def layer_errors(x: torch.Tensor, weight: torch.Tensor, n: int = 2, m: int = 4) -> dict:
    """Errors and activation statistics of one layer on its input rows ``x [T, K]`` (float32 math)."""
    x = reference.pad_to_multiple(x.to(weight.device).float(), m)
    w = reference.pad_to_multiple(weight.detach().float(), m)
    y = F.linear(x, w)
    xp = reference.prune_nm(x, n, m)
    y_act = F.linear(xp, w)
    s = reference.norm_scale(x, xp).unsqueeze(-1)
    chan = x.pow(2).mean(0).sqrt()
    energy = (xp.pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-30)).mean()
    outliers = int((chan > OUTLIER_FACTOR * chan.median().clamp_min(1e-30)).sum())
    return {
        "weight_magnitude": _rel(F.linear(x, reference.prune_weight_magnitude(w, n, m)), y),
        "weight_wanda": _rel(F.linear(x, reference.prune_weight_wanda(w, reference.channel_norm(x), n, m)), y),
        "act": _rel(y_act, y),
        "act_norm": _rel(y_act * s, y),
        "energy_kept": float(energy),
        "outlier_channels": outliers,
        "outlier_share": outliers / x.shape[-1],
        "tokens": x.shape[0],
    }


def _analysis_layers(module: nn.Module, preset: str | None) -> list[str]:
    if preset in (None, "auto-all"):
        base = resolve_preset("auto", type(module).__name__)
        preset = f"{base}-all" if f"{base}-all" in PRESETS else base
    return eligible_layers(module, SparsityConfig(preset=preset))


def analyze(model, inputs, n: int = 2, m: int = 4, preset: str | None = None,
            max_tokens: int = 4096, progress: bool = True) -> list[dict]:
    """Run ``model`` dense on ``inputs`` (one kwargs dict, or a list of them) and return one row per
    token-level linear (``preset`` picks them; default: all token linears of the model).
    ``max_tokens`` input rows per layer are kept (a deterministic stride over what was seen)."""
    from tqdm.auto import tqdm

    module = _as_module(model)
    batches = [inputs] if isinstance(inputs, dict) else list(inputs)
    names = _analysis_layers(module, preset)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [module.get_submodule(name).register_forward_hook(
        lambda mod, inp, out, name=name: seen[name].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).cpu()))
        for name in names]
    try:
        with torch.no_grad(), dense_mode(module):
            for kw in tqdm(batches, desc="forward", disable=not progress):
                module(**kw)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name in tqdm(names, desc="layers", disable=not progress):
        if not seen[name]:
            continue
        x = torch.cat(seen[name])
        if x.shape[0] > max_tokens:
            x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
        layer = module.get_submodule(name)
        w = layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight  # SparseActLinear or Linear
        rows.append({"layer": name, "K": layer.in_features, "N": layer.out_features, **layer_errors(x, w, n, m)})
    return rows


def write_csv(rows: list[dict], path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def means(rows: list[dict]) -> dict:
    return {v: sum(r[v] for r in rows) / len(rows) for v in (*VARIANTS, "energy_kept")}


def plot(rows: list[dict], path, title: str = "", n: int = 2, m: int = 4) -> Path:
    """Per-layer relative output error of each variant, and the means, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax, axm) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [4, 1]})
    xs = range(len(rows))
    styles = {"weight_magnitude": ("tab:red", "o"), "weight_wanda": ("tab:orange", "s"),
              "act": ("tab:blue", "^"), "act_norm": ("tab:green", "v")}
    for v in VARIANTS:
        color, marker = styles[v]
        ax.plot(xs, [r[v] for r in rows], marker=marker, ms=3, lw=1, color=color, label=LABELS[v].replace("N:M", f"{n}:{m}"))
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("relative output error |Y - Y~| / |Y|")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"{n}:{m} sparsity: per-layer output error")
    mu = means(rows)
    axm.bar(range(len(VARIANTS)), [mu[v] for v in VARIANTS], color=[styles[v][0] for v in VARIANTS])
    axm.set_xticks(range(len(VARIANTS)), ["W mag", "W Wanda", "X", "X+norm"], fontsize=8)
    axm.set_title(f"mean over {len(rows)} layers")
    axm.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(rows: list[dict]) -> str:
    mu = means(rows)
    lines = [f"{len(rows)} layers; mean relative output error:"]
    lines += [f"  {LABELS[v]:28s} {mu[v]:.4f}" for v in VARIANTS]
    lines.append(f"  share of activation energy kept by top-n-of-m: {mu['energy_kept']:.3f}")
    worst = sorted(rows, key=lambda r: -r["act_norm"])[:5]
    lines.append("  most sensitive layers (activation + norm): " + ", ".join(f"{r['layer']} {r['act_norm']:.3f}" for r in worst))
    return "\n".join(lines)


