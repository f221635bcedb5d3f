"""Which sites must run dense on the final steps (issue 18): the step schedule per site group, not per model.

`dense_below_t=0.2` (every sparse layer dense on the last 20 % of the steps) takes the mini-FLUX from FID 62.9 to 19.1
with the centred + global LoRA (benchmarks/NOTES.md v18), but those steps give back a fifth of the speed-up. If the
grain of the final steps comes from a few site groups, running only those dense there buys most of the quality for a
share of the cost. rtlynx's step gate is per layer (``rtlynx.schedule.install(model, layers, below)``), so this
needs no new code in the library. Paired PSNR / SSIM against dense on held-out prompts (same noise), the centred +
global LoRA (``results/centre_global500_h100_lora``), reference path on the CPU. The cost column is each group's
share of the sparse GEMM FLOPs of FLUX.1-dev at 1024x1024 (the same layer names; ``../shared/gemm_shapes``) times
the share of steps with t < below: the fraction of the sparse layers' work that runs dense.

    python benchmarks/late_sites_probe.py [--prompts-file .cache/prompts_all.txt] [--n 16 --steps 30]
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx

from rtlynx import api, io, schedule  # noqa: E402
from rtlynx.benchtools import add_row, run_metadata  # noqa: E402
from rtlynx.eval import fid as F  # noqa: E402
from rtlynx.models.miniflux import load_miniflux, to_uint8  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LORA = RESULTS / "centre_global500_h100_lora"
# FLUX.1-dev, 1024x1024, batch 1: GFLOP per forward of each sparse layer pattern (../shared/gemm_shapes/
# target_models.csv: 2 M K N x blocks), the preset "flux" layers the mini-FLUX shares
FLUX_GFLOP = {
    "transformer_blocks.*.attn.to_[qkv]": 3 * 1468.879,
    "transformer_blocks.*.ff.net.0.proj": 5875.515,
    "transformer_blocks.*.ff.net.2": 5875.515,
    "single_transformer_blocks.*.attn.to_[qkv]": 3 * 3304.977,
    "single_transformer_blocks.*.proj_mlp": 13219.909,
    "single_transformer_blocks.*.proj_out": 16524.887,
}
GROUPS = {  # name -> the patterns whose layers run dense on the final steps
    "all (dense_below_t)": list(FLUX_GFLOP),
    "double blocks": [p for p in FLUX_GFLOP if p.startswith("transformer_blocks")],
    "single blocks": [p for p in FLUX_GFLOP if p.startswith("single")],
    "single QKV + MLP up": ["single_transformer_blocks.*.attn.to_[qkv]", "single_transformer_blocks.*.proj_mlp"],
    "single proj_out": ["single_transformer_blocks.*.proj_out"],
    "MLP down + proj_out (post-GELU inputs)": ["transformer_blocks.*.ff.net.2",
                                              "single_transformer_blocks.*.proj_out"],
    "double QKV + MLP up": ["transformer_blocks.*.attn.to_[qkv]", "transformer_blocks.*.ff.net.0.proj"],
}


def flop_share(patterns) -> float:
    return sum(FLUX_GFLOP[p] for p in patterns) / sum(FLUX_GFLOP.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts-file", default=".cache/prompts_all.txt")
    ap.add_argument("--n", type=int, default=16, help="held-out prompts for paired PSNR / SSIM")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--below", type=float, default=0.2)
    ap.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--lora", default=str(LORA), help="the LoRA (an rtlynx save; default: the centred + global one)")
    ap.add_argument("--out", default=str(RESULTS / "late_sites_probe_cpu.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = load_miniflux()
    lora = Path(args.lora).resolve()
    io.load(model.transformer, lora, dense_below_t=None, backend="reference")
    layers = api.sparse_layers(model.transformer)
    held = Path(args.prompts_file).read_text().splitlines()[200:200 + args.n]  # centering_probe.py's held-out slice
    out = {**run_metadata(), "model": "shipped mini-FLUX, reference path", "lora": lora.name,
           "n_held_out": args.n, "steps": args.steps,
           "below": args.below, "rows": []}
    t0 = time.time()
    with api.dense_mode(model.transformer):
        ref = to_uint8(model.sample(held, num_steps=args.steps, seed=0))
    runs = [("none (every step sparse)", [])] + [(g, GROUPS[g]) for g in args.groups]
    for name, patterns in runs:
        chosen = [l for n, l in layers.items() if any(fnmatch.fnmatch(n, p) for p in patterns)]
        schedule.install(model.transformer, chosen, args.below)
        gate = schedule.gate_of(model.transformer)
        dense_calls = calls = 0
        if gate is not None:  # count the calls the gate runs dense (the share of steps)
            def count(mod, a, kw, y):
                nonlocal dense_calls, calls
                calls += 1
                dense_calls += gate.dense
            h = model.transformer.register_forward_hook(count, with_kwargs=True)
        img = to_uint8(model.sample(held, num_steps=args.steps, seed=0))
        if gate is not None:
            h.remove()
        schedule.remove(model.transformer, chosen)
        step_share = dense_calls / calls if calls else 0.0
        row = {"dense_late": name, "layers": len(chosen), "flux_flop_share": flop_share(patterns),
               "dense_step_share": step_share, "dense_work_share": flop_share(patterns) * step_share,
               **F.paired_metrics(img.numpy(), ref.numpy())}
        add_row(out, row, args.out, t0, f"{name:40s} {len(chosen):3d} layers  work dense "
                f"{row['dense_work_share']:6.1%}  PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.3f}")
    print(f"wrote {args.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
