"""Which 2 of every 4 to keep: selection scores beyond |x| at the layer level (issue 18 item 3; CPU is enough).

Records the inputs of the shipped mini-FLUX's 60 sparse layers over dense samples (rtlynx.dense_mode, forward
pre-hooks), splits the rows of every layer into a calibration half (the prompts of even index) and a held-out half,
and measures on the held-out half the relative output error of 2:4 with the norm scale, no LoRA:
``|s * (x * mask) W^T - x W^T| / |x W^T|`` (Frobenius over all rows of a layer; the mean over layers is reported).
The mask keeps the 2 largest of every 4 of ``|x_k| * c_k`` for a per-channel static factor c (``c W`` would be
folded into the weights offline, so every score here costs the kernels nothing but that fold):

- ``abs``: c = 1, RT-Lynx today;
- ``wanda``: c_k = |W[:, k]| (Wanda-like, per layer);
- ``smooth a``: SmoothQuant's migration, c_k = max|W[:, k]|^(1-a) / max|X_k|^a with max|X_k| from the calibration
  half (a = 0.25, 0.5, 0.75): outlier channels are divided down before the selection;
- ``centred``: for reference, c = 1 on x - (token mean of the sample) with (mean) W^T added back (NOTES v13).

    python benchmarks/selection_scores.py [--prompts 8 --steps 10 --every 7]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx

from rtlynx import api  # noqa: E402
from rtlynx.benchtools import run_metadata  # noqa: E402
from rtlynx.demo import DEMO_PROMPTS  # noqa: E402
from rtlynx.models.miniflux import load_miniflux  # noqa: E402
from rtlynx.reference import nm as R  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def record(model, prompts: list[str], steps: int, every: int, label=None, labels: int = 1):
    """rows[layer][prompt][l]: a list of [rows, K] tensors (every ``every``-th token row of each call, dense
    sampler, one prompt per sample); ``label(transformer, args, kwargs)`` puts each transformer call in one of
    ``labels`` groups (default: all in group 0)."""
    tr = model.transformer
    layers = api.sparse_layers(tr)
    rows = {n: [[[] for _ in range(labels)] for _ in prompts] for n in layers}
    state = {"p": 0, "l": 0}

    def on_call(mod, args, kwargs):
        state["l"] = label(mod, args, kwargs) if label else 0

    def hook(name):
        def f(mod, args):
            x = args[0].detach().float()  # [B, T, K] (B: the prompt and its CFG null) or [rows, K]
            rows[name][state["p"]][state["l"]].append(x[:, ::every].reshape(-1, x.shape[-1]) if x.dim() == 3
                                                      else x[::every])
        return f

    handles = [tr.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad(), api.dense_mode(tr):
            for i, p in enumerate(prompts):
                state["p"] = i
                model.sample([p], num_steps=steps, seed=i)
    finally:
        for h in handles:
            h.remove()
    return rows


def layer_error(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor | None, centre: bool = False) -> float:
    y = x @ w.T
    mu = x.mean(0, keepdim=True) if centre else torch.zeros(1, x.shape[1])
    xc = x - mu
    mask = R.nm_mask(xc, 2, 4, score=xc.abs() * c if c is not None else None)
    xp = xc * mask
    s = R.norm_scale(xc, xp)
    yh = s[:, None] * (xp @ w.T) + mu @ w.T
    return float((yh - y).norm() / y.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=7, help="keep every n-th token row")
    ap.add_argument("--out", default=str(RESULTS / "selection_scores_cpu.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    model = load_miniflux()
    api.sparsify(model.transformer, backend="reference", speed_rules=False)
    prompts = (DEMO_PROMPTS * ((args.prompts + len(DEMO_PROMPTS) - 1) // len(DEMO_PROMPTS)))[: args.prompts]
    data = {n: [torch.cat(p[0]) for p in per] for n, per in record(model, prompts, args.steps, args.every).items()}
    layers = api.sparse_layers(model.transformer)
    scores = ["abs", "wanda", "smooth 0.25", "smooth 0.5", "smooth 0.75", "centred"]
    per_layer = {s: {} for s in scores}
    for name, per in data.items():
        calib, held = torch.cat(per[0::2]), torch.cat(per[1::2])
        w = layers[name].dense_weight().detach().float()
        wmax, xmax = w.abs().amax(0).clamp_min(1e-12), calib.abs().amax(0).clamp_min(1e-12)
        cs = {"abs": None, "wanda": w.norm(dim=0), "centred": None}
        for a in (0.25, 0.5, 0.75):
            cs[f"smooth {a}"] = wmax ** (1 - a) / xmax ** a
        for s in scores:
            per_layer[s][name] = layer_error(held, w, cs[s], centre=s == "centred")
    mean = {s: sum(v.values()) / len(v) for s, v in per_layer.items()}
    out = {**run_metadata(), "device": "cpu", "model": "shipped mini-FLUX, 60 sparse layers (preset flux)",
           "prompts": len(prompts), "steps": args.steps, "every": args.every,
           "rows_held_out": {n: int(sum(p.shape[0] for p in per[1::2])) for n, per in list(data.items())[:1]},
           "mean_rel_error": mean, "vs_abs": {s: mean[s] / mean["abs"] - 1 for s in scores},
           "per_layer": per_layer, "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1))
    for s in scores:
        print(f"{s:12s} mean relative error {mean[s]:.4f}  ({100 * out['vs_abs'][s]:+.1f} % vs |x|)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
