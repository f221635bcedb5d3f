"""Where does the mini-FLUX lose its FID under 2:4 activation sparsity? (GPU)

RT-Lynx on the shipped mini-FLUX keeps paired PSNR (+3.1 dB over naive activation 2:4) but its FID is 5x the
dense one: the sparse samples carry a fine grain. This benchmark varies one thing at a time from the shipped
RT-Lynx configuration (preset `flux`, norm + LoRA) and reports FID / KID against Emoji-64, paired PSNR vs
dense and a grain measure (mean |Laplacian| of the luma, relative to dense):

- which layers are sparse: attention QKV only, MLP only, MLP up / down only, double / single blocks only;
- which sampling steps are sparse: dense for the last (t < a) or first (t > b) steps of the trajectory.

Same prompts, seeds and noise for every row (protocol of benchmarks/quality.py / rtlynx.eval.fid).

    python benchmarks/fid_ablation.py --prompts-file P --inception I --reference-features R [--n 5000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rtlynx import api, demo, schedule
from rtlynx.benchtools import run_metadata
from rtlynx.eval import fid as F
from rtlynx.models.miniflux import ASSET_DIR, load_miniflux

RESULTS = Path(__file__).resolve().parent / "results"
MLP = ("ff.net", "proj_mlp", "proj_out")
RTLYNX = dict(mode="sparse", compensation="norm", lora=True)
NAIVE = dict(mode="sparse", compensation="none", lora=False)

# name -> (configure kwargs, substrings of the layers kept sparse (None: all), sampling-t window run dense)
ABLATIONS = {
    "dense": (dict(mode="dense"), None, None),
    "rtlynx": (RTLYNX, None, None),
    "rtlynx, dense t<0.1": (RTLYNX, None, (0.0, 0.1)),
    "rtlynx, dense t<0.2": (RTLYNX, None, (0.0, 0.2)),
    "rtlynx, dense t<0.35": (RTLYNX, None, (0.0, 0.35)),
    "rtlynx, dense t>0.8": (RTLYNX, None, (0.8, 1.0)),
    "rtlynx, attention QKV only": (RTLYNX, ("attn.to_",), None),
    "rtlynx, MLP only": (RTLYNX, MLP, None),
    "rtlynx, MLP up only": (RTLYNX, ("ff.net.0", "proj_mlp"), None),
    "rtlynx, MLP down only": (RTLYNX, ("ff.net.2", "proj_out"), None),
    "rtlynx, double blocks only": (RTLYNX, ("transformer_blocks.",), None),
    "rtlynx, single blocks only": (RTLYNX, ("single_transformer_blocks.",), None),
    "act24, dense t<0.2": (NAIVE, None, (0.0, 0.2)),
}


def grain(u8: np.ndarray) -> float:
    x = torch.as_tensor(u8).float().mean(-1)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(lap.abs().mean())


def apply(model, kwargs, names, window):
    """Configure the sparse layers; returns a hook handle that runs them dense inside the t window."""
    layers = api.sparse_layers(model.transformer)
    api.configure(model.transformer, **kwargs)
    chosen = {n: l for n, l in layers.items() if names is None or any(n.startswith(s) or f".{s}" in n for s in names)}
    mode = kwargs.get("mode", "sparse")

    def pre(mod, args, kw):
        t = schedule.noise_level(mod, args, kw)
        on = window is None or not (window[0] <= t <= window[1])
        pre.dense_steps += not on
        for n, layer in layers.items():
            layer.mode = mode if (on and n in chosen) else "dense"

    pre.dense_steps = 0
    return pre, model.transformer.register_forward_pre_hook(pre, with_kwargs=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts-file", required=True)
    ap.add_argument("--inception", default=str(F.DEFAULT_INCEPTION))
    ap.add_argument("--reference-features", required=True, help="npz of the Emoji-64 Inception features")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run only")
    ap.add_argument("--only", nargs="*", default=None, help="subset of the ablation names")
    ap.add_argument("--budget-s", type=float, default=480, help="start no new row after this many seconds")
    ap.add_argument("--out", default=str(RESULTS / "fid_ablation.json"))
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/fid_ablation.py needs a CUDA GPU (--device cpu for a smoke run)")

    model = load_miniflux(ASSET_DIR, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    demo.prepare(model, demo.LORA_DIR, backend=args.backend)
    net = F.load_inception(args.inception, dev)
    real = F.reference_features(net, None, args.reference_features)
    prompts = F.fid_prompts(Path(args.prompts_file).read_text().splitlines(), args.n, 0)
    steps = args.steps or model.config["num_steps"]
    rows, dense_u8, t_start = {}, None, time.time()
    for name, (kw, names, window) in ABLATIONS.items():
        if args.only and name not in args.only and name != "dense":
            continue
        if time.time() - t_start > args.budget_s:
            print(f"time budget spent, skipping {name}")
            continue
        hook, h = apply(model, kw, names, window)
        t0 = time.time()
        try:
            u8 = F.generate(model, prompts, args.batch_size, 0, progress=False, num_steps=steps)
        finally:
            h.remove()
        feats = F.inception_features(net, u8)
        kid, kid_std = F.kid_from_features(feats, real)
        row = {"fid": F.fid_from_features(feats, real), "kid": kid, "kid_std": kid_std, "grain": grain(u8),
               "dense_steps": hook.dense_steps * args.batch_size // args.n, "seconds": time.time() - t0}
        if dense_u8 is None:
            dense_u8 = u8
        else:
            row.update(F.paired_metrics(u8, dense_u8))
        row["grain_vs_dense"] = row["grain"] / rows["dense"]["grain"] if rows else 1.0
        rows[name] = row
        print(f"{name:30s} " + " ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    out = {**run_metadata(), "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "n_generated": args.n, "steps": steps, "backend": args.backend,
           "lora_dir": str(demo.LORA_DIR), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
