"""Centred pruning probe (issue 18 item 3): prune ``x - c`` instead of ``x`` and add ``c W^T`` back.

For any vector c per sample, ``y = s * prune(x - c) W^T + c W^T + b + (x A^T) B^T`` is the dense ``x W^T + b`` up to
the pruning error of ``x - c`` (the ``c W^T`` term is exact). Where a layer's inputs share a per-channel offset across
tokens (AdaLN shifts, post-GELU means), removing it first leaves less for 2:4 to throw away. This probe emulates it on
the reference math with forward hooks on the shipped mini-FLUX (CPU is enough) and compares, with the closed-form
rank-8 LoRA refitted on the same calibration data for every choice of c (rtlynx.distill's solver):

- ``none``: c = 0 (RT-Lynx today);
- ``static``: c = the layer's mean input over the calibration run (a constant: ``c W^T`` folds into the bias, free);
- ``mean``: c = the token mean of the sample in this call (one extra reduction over x per site);
- ``prev``: c = the token mean this layer saw in its previous call (the previous sampling step; no extra pass).

Reports the residual energy before the LoRA and paired PSNR / SSIM vs dense on held-out prompts.

    python benchmarks/centering_probe.py [--prompts-file .cache/prompts_all.txt] [--n 16 --steps 15 --calib 16]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx

from rtlynx import api, io  # noqa: E402
from rtlynx.benchtools import run_metadata  # noqa: E402
from rtlynx.demo import LORA_DIR  # noqa: E402
from rtlynx.distill import LayerStats, solve_lora  # noqa: E402
from rtlynx.eval import fid as F  # noqa: E402
from rtlynx.models.miniflux import load_miniflux, to_uint8  # noqa: E402
from rtlynx.nn import SparseActLinear  # noqa: E402
from rtlynx.reference import nm as R  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CENTRES = ("none", "static", "mean")


class Probe:
    """Forward hooks that replace each sparse layer's (dense-mode) output by the emulated centred sparse output."""

    def __init__(self, layers: dict[str, SparseActLinear]):
        self.layers, self.mode, self.lora = layers, "dense", None
        self.static, self.prev, self.stats = {}, {}, {}
        self._acc = collections.defaultdict(list)
        for name, m in layers.items():
            m.register_forward_hook(lambda mod, a, out, n=name: self.hook(mod, a[0], out, n))

    def centre(self, name: str, x3: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "static":
            return self.static[name][None, None, :]
        if mode == "mean":
            return x3.mean(1, keepdim=True)
        if mode == "prev":
            cur, p = x3.mean(1, keepdim=True), self.prev.get(name)
            self.prev[name] = cur
            return p if p is not None and p.shape == cur.shape else self.static[name][None, None, :]
        return torch.zeros_like(x3[:, :1])

    def hook(self, m, x, out, name):
        if self.mode == "dense":
            return out
        x3 = x.float() if x.dim() == 3 else x.float()[None]
        if self.mode == "calib-mean":
            self._acc[name].append(x3.mean(1).mean(0))
            return out
        kind, mode = self.mode.split(":") if ":" in self.mode else ("run", self.mode)
        w = m.weight.float()
        c = self.centre(name, x3, mode)
        xc = x3 - c
        xp = torch.where(R.nm_mask(xc, 2, 4), xc, torch.zeros_like(xc))
        xps = xp * R.norm_scale(xc, xp)[..., None]
        if kind == "stats":  # closed-form LoRA statistics of this centring: R = (x - c - s x~) W^T
            xr = x3.reshape(-1, x3.shape[-1])
            r = (x3 - c - xps).reshape(-1, x3.shape[-1]) @ w.T
            st = self.stats.setdefault((mode, name), LayerStats.empty(xr.shape[1], w.shape[0]))
            st.xtx += xr.T @ xr
            st.xtr += xr.T @ r
            st.rr += float(r.double().pow(2).sum())
            st.yy += float((xr @ w.T).double().pow(2).sum())
            st.rows += xr.shape[0]
            return out
        y = xps @ w.T + c @ w.T
        if m.bias is not None:
            y = y + m.bias.float()
        if self.lora is not None:
            a, b = self.lora[name]
            y = y + (x3 @ a.T) @ b.T
        return y.reshape(*x.shape[:-1], -1).to(out.dtype)

    def finish_static(self):
        self.static = {n: torch.stack(v).mean(0) for n, v in self._acc.items()}


def shipped_sparse_model():
    """The shipped mini-FLUX with its LoRA, every step sparse, and its sparse layers by name (CPU, fp32)."""
    model = load_miniflux()
    io.load(model.transformer, LORA_DIR, dense_below_t=None)
    return model, {n: m for n, m in model.transformer.named_modules() if isinstance(m, SparseActLinear)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts-file", default=".cache/prompts_all.txt")
    ap.add_argument("--n", type=int, default=16, help="held-out prompts for paired PSNR / SSIM")
    ap.add_argument("--calib", type=int, default=16, help="calibration prompts (LoRA refit, static c)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS / "centering_probe_cpu.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, layers = shipped_sparse_model()
    shipped = {n: (m.lora_A.detach().float(), m.lora_B.detach().float()) for n, m in layers.items()}
    allp = Path(args.prompts_file).read_text().splitlines()
    held, cal = allp[200:200 + args.n], allp[5000:5000 + args.calib]  # disjoint slices
    probe, t0 = Probe(layers), time.time()
    out = {**run_metadata(), "model": "shipped mini-FLUX, its 60 sparse layers, reference math (forward hooks)",
           "n_held_out": args.n, "n_calib": args.calib, "steps": args.steps, "rank": args.rank, "rows": []}
    with api.dense_mode(model.transformer):
        probe.mode = "calib-mean"
        model.sample(cal, num_steps=args.steps, seed=1)
        probe.finish_static()
        for c in CENTRES:
            probe.mode = f"stats:{c}"
            model.sample(cal, num_steps=args.steps, seed=1)
        loras, energy = {}, {}
        for c in CENTRES:
            loras[c] = {n: tuple(t.float() for t in solve_lora(probe.stats[(c, n)], args.rank)) for n in layers}
            energy[c] = (sum(probe.stats[(c, n)].rr for n in layers) / sum(probe.stats[(c, n)].yy for n in layers))
        print(f"calibration {time.time() - t0:.0f} s; residual / output energy before the LoRA: "
              + ", ".join(f"{c} {e:.4f}" for c, e in energy.items()), flush=True)
        out["residual_energy_no_lora"] = energy
        probe.mode, probe.lora = "dense", None
        ref = to_uint8(model.sample(held, num_steps=args.steps, seed=0))
        for name, mode, lora in [("none, shipped LoRA", "none", shipped), ("none", "none", loras["none"]),
                                 ("static", "static", loras["static"]), ("mean", "mean", loras["mean"]),
                                 ("prev (LoRA of mean)", "prev", loras["mean"])]:
            probe.mode, probe.lora = mode, lora
            probe.prev.clear()
            img = to_uint8(model.sample(held, num_steps=args.steps, seed=0))
            row = {"variant": name, **F.paired_metrics(img.numpy(), ref.numpy())}
            out["rows"].append(row)
            print(f"{name:22s} PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.3f}", flush=True)
            Path(args.out).write_text(json.dumps(out, indent=1))  # row by row
    out["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
