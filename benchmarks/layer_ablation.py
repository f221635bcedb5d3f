"""Which layers hurt? Sparsify one group of the mini-FLUX's paper-preset layers at a time (the rest dense)
and measure paired PSNR / SSIM against the dense images, with and without the compensation.

    python benchmarks/layer_ablation.py --device cpu --prompts 4 --steps 20

Writes benchmarks/results/layer_ablation.json and prints a table.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
from pathlib import Path

import torch

from rtlynx import api, demo
from rtlynx.benchtools import run_metadata
from rtlynx.eval.fid import paired_metrics
from rtlynx.models.miniflux import load_miniflux, to_uint8

GROUPS = {
    "double QKV (image)": ["transformer_blocks.*.attn.to_[qkv]"],
    "double QKV (text)": ["transformer_blocks.*.attn.add_[qkv]_proj"],
    "double MLP up": ["transformer_blocks.*.ff.net.0.proj", "transformer_blocks.*.ff_context.net.0.proj"],
    "double MLP down": ["transformer_blocks.*.ff.net.2", "transformer_blocks.*.ff_context.net.2"],
    "single QKV": ["single_transformer_blocks.*.attn.to_[qkv]"],
    "single MLP up": ["single_transformer_blocks.*.proj_mlp"],
    "single proj_out (attn out + MLP down)": ["single_transformer_blocks.*.proj_out"],
    "double MLP up (image)": ["transformer_blocks.*.ff.net.0.proj"],
    "double MLP up (text)": ["transformer_blocks.*.ff_context.net.0.proj"],
    "text stream (QKV + MLP)": ["transformer_blocks.*.attn.add_[qkv]_proj", "transformer_blocks.*.ff_context.*"],
    "image stream (paper preset minus text)": ["transformer_blocks.*.attn.to_[qkv]", "transformer_blocks.*.ff.*",
                                               "single_transformer_blocks.*"],
    "all (paper preset)": ["*"],
}
SETTINGS = {"act 2:4": dict(compensation="none", lora=False),
            "RT-Lynx": dict(compensation="norm", lora=True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--groups", nargs="*", default=None, help="run only these group names (default: all)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "layer_ablation.json"))
    args = ap.parse_args(argv)

    model = load_miniflux(device=args.device)
    if not demo.prepare(model, backend="reference"):
        raise SystemExit("needs the shipped LoRA (rtlynx/assets/miniflux-lynx)")
    layers = api.sparse_layers(model.transformer)
    prompts = demo.DEMO_PROMPTS[: args.prompts]
    noise = torch.randn(len(prompts), model.grid ** 2, 48, generator=torch.Generator().manual_seed(0))

    def sample():
        return to_uint8(model.sample(prompts, num_steps=args.steps, noise=noise)).cpu()

    api.configure(model.transformer, mode="dense")
    dense = sample()
    rows, t0 = [], time.time()
    for group, globs in GROUPS.items():
        if args.groups and group not in args.groups:
            continue
        chosen = [n for n in layers if any(fnmatch.fnmatchcase(n, g) for g in globs)]
        for setting, kw in SETTINGS.items():
            api.configure(model.transformer, mode="dense")
            for n in chosen:
                layers[n].mode = "sparse"
                layers[n].compensation = kw["compensation"]
                layers[n].lora_enabled = kw["lora"]
            m = paired_metrics(sample(), dense)
            rows.append({"group": group, "layers": len(chosen), "setting": setting, "psnr": m["psnr"], "ssim": m["ssim"]})
            print(f"{group:40s} {len(chosen):3d} {setting:16s} PSNR {m['psnr']:6.2f} dB  SSIM {m['ssim']:.3f}", flush=True)
    Path(args.out).write_text(json.dumps({**run_metadata(), "device": args.device, "prompts": prompts, "steps": args.steps,
                                          "rows": rows, "seconds": time.time() - t0}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
