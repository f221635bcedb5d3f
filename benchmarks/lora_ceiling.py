"""How much of the 2:4 pruning error can a linear (LoRA) correction remove, per layer type and per
sampling phase? (CPU is enough: a few prompts.)

For each sparse layer of the shipped mini-FLUX (preset `flux`, norm compensation) the residual
R = x W^T - s (x~ W^T) is collected along dense sampling trajectories, split by the noise level t of the
call (final steps t < 0.2 vs the rest). From the streamed statistics (rtlynx.distill) we solve the best
rank-r correction in closed form for r = 8, 32 and full rank, and report the relative output error
|Y - Y~| / |Y| left over, plus the share of the input energy that top-2-of-4 keeps. The errors are
in-sample (fitted and measured on the same rows), so they are the best case for each rank; the full-rank
row is the ceiling of any linear correction of x.

    python benchmarks/lora_ceiling.py [--prompts 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rtlynx import api, demo, distill, reference, schedule
from rtlynx.benchtools import run_metadata
from rtlynx.models.miniflux import load_miniflux

RESULTS = Path(__file__).resolve().parent / "results"
TYPES = {"Q/K/V": ("attn.to_",), "MLP up": ("ff.net.0", "proj_mlp"), "MLP down": ("ff.net.2", "proj_out")}
PHASES = ("t >= 0.2", "t < 0.2")


def layer_type(name: str) -> str:
    return next(t for t, keys in TYPES.items() if any(k in name for k in keys))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 0], help="0 = full rank")
    ap.add_argument("--out", default=str(RESULTS / "lora_ceiling.json"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = load_miniflux(device="cpu", dtype=torch.float32)
    api.sparsify(model.transformer, preset="flux", backend="reference")
    layers = api.sparse_layers(model.transformer)
    phase = {"now": 0}
    stats = {p: {n: distill.LayerStats.empty(l.in_features, l.out_features) for n, l in layers.items()} for p in PHASES}
    kept = {p: {n: [0.0, 0.0] for n in layers} for p in PHASES}

    def on_call(mod, a, kw):
        phase["now"] = PHASES[int(schedule.noise_level(mod, a, kw) < 0.2)]

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0].reshape(-1, mod.in_features).float()
            stats[phase["now"]][name].add(x, mod)
            xs = reference.prune_nm(x, mod.n, mod.m)
            kept[phase["now"]][name][0] += float(xs.double().pow(2).sum())
            kept[phase["now"]][name][1] += float(x.double().pow(2).sum())
        return fn

    handles = [model.transformer.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
    prompts = (demo.DEMO_PROMPTS * 4)[: args.prompts]
    try:
        with torch.no_grad(), api.dense_mode(model.transformer):
            model.sample(prompts, num_steps=args.steps, seed=0)
    finally:
        for h in handles:
            h.remove()

    rows = []
    for p in PHASES:
        for n, s in stats[p].items():
            row = {"layer": n, "type": layer_type(n), "phase": p, "rows": s.rows,
                   "energy_kept": kept[p][n][0] / max(kept[p][n][1], 1e-30), "err_norm": distill.residual_error(s)}
            for r in args.ranks:
                a, b = distill.solve_lora(s, r or min(s.k, s.n), ridge=1e-6)
                row[f"err_r{r or 'full'}"] = distill.residual_error(s, a, b)
            rows.append(row)
    keys = ["energy_kept", "err_norm"] + [f"err_r{r or 'full'}" for r in args.ranks]
    summary = {}
    print(f"{'type':10s} {'phase':9s} " + " ".join(f"{k:>11s}" for k in keys))
    for t in TYPES:
        for p in PHASES:
            sel = [r for r in rows if r["type"] == t and r["phase"] == p]
            mean = {k: sum(r[k] for r in sel) / len(sel) for k in keys}
            if "err_rfull" in mean:
                mean["removed_full_rank"] = 1 - (mean["err_rfull"] / mean["err_norm"]) ** 2
            summary[f"{t}, {p}"] = mean
            print(f"{t:10s} {p:9s} " + " ".join(f"{mean[k]:11.4f}" for k in keys)
                  + (f"   (full rank removes {100 * mean['removed_full_rank']:.0f}% of the residual energy)"
                     if "removed_full_rank" in mean else ""))
    Path(args.out).write_text(json.dumps({**run_metadata(), "device": "cpu", "prompts": prompts, "steps": args.steps,
                                          "summary": summary, "layers": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
