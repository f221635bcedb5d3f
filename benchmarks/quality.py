"""Quality benchmark on the shipped mini-FLUX (GPU): FID / KID against Emoji-64 and paired PSNR / SSIM
against the dense model, for the five variants (dense, weight 2:4, activation 2:4, + norm, RT-Lynx).

Protocol: n images (default 5000) from prompts drawn uniformly over Emoji-64 with a fixed seed; batch i
starts from the noise of seed + i, the same for every variant, so the paired metrics compare the same
prompt, seed and noise. FID / KID / Inception preprocessing: see rtlynx.eval.fid. Sparse variants run on
--backend (default reference: the quality of the method, independent of kernel rounding; lynx on sm_90 is
about 3x faster and was checked to give the same paired PSNR).

    python benchmarks/quality.py --data .cache/emoji64.npz --inception .cache/inception_fp16.pt

--reference-features FILE caches the Inception features of Emoji-64 (fp32 npz); once it exists the dataset
itself is no longer needed, only its prompts (--prompts-file) — see benchmarks/fid_session.sh.

--attention NAME runs every variant on that diffusers attention backend (``set_attention_backend``, e.g. an FP8 or
INT8 one: issue 19 item 1); with "dense" among the variants a dense run on the default SDPA comes first
("dense_sdpa", FID included), and every row also gets its paired PSNR / SSIM against it (psnr_vs_sdpa).

--dense-images FILE.npz keeps the dense images of this protocol (prompts, seed, steps, dtype, weights): written after
a dense run, reused by a later run with the same protocol (its dense row is then scored from them, not regenerated),
and paired against when "dense" is not among the variants. Several LoRAs (one per run) then share one dense run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from rtlynx import api, demo
from rtlynx.benchtools import run_metadata
from rtlynx.data import emoji64
from rtlynx.eval import fid as F
from rtlynx.models.miniflux import ASSET_DIR, load_miniflux

RESULTS = Path(__file__).resolve().parent / "results"

# FP8 variants (issue "FP8 + 2:4"), on the same layers as the sparse ones:
# - dense_fp8: the dense layers with FP8 e4m3 operands (x per token, W per output channel: rtlynx.reference.fp8's
#   scales; what torchao's float8 dynamic-activation linears compute), emulated: weights round-tripped through e4m3
#   in place for the variant, inputs through a forward pre-hook
# - rtlynx_fp8: RT-Lynx with dtype="fp8" (the FP8 sparse kernels on sm_90 + lynx, the FP8 spec elsewhere)
FP8_VARIANTS = {
    "dense_fp8": ("dense FP8", dict(mode="dense", dtype="native")),
    "rtlynx_fp8": ("RT-Lynx FP8", dict(mode="sparse", compensation="norm", lora=True, dtype="fp8")),
}
# The step schedule as a variant, so one run (one set of dense images) measures both settings of a LoRA
SCHEDULE_VARIANTS = {
    "rtlynx_t0.2": ("RT-Lynx, t < 0.2 dense", dict(mode="sparse", compensation="norm", lora=True, dense_below_t=0.2)),
    "rtlynx_fp8_t0.2": ("RT-Lynx FP8, t < 0.2 dense",
                        dict(mode="sparse", compensation="norm", lora=True, dtype="fp8", dense_below_t=0.2)),
}
ALL_VARIANTS = {**demo.VARIANTS, **FP8_VARIANTS, **SCHEDULE_VARIANTS}
SDPA_VARIANT = {"dense_sdpa": ("dense, SDPA", dict(mode="dense", dtype="native"))}  # --attention's baseline


class _DenseFP8:
    """Context: every sparse layer of ``transformer`` runs its dense product on e4m3-quantised operands."""

    def __init__(self, transformer):
        self.layers = list(api.sparse_layers(transformer).values())

    def __enter__(self):
        from rtlynx.reference.fp8 import dequantize, quantize_rows_e4m3

        def hook(mod, args):
            x = args[0]
            return (dequantize(*quantize_rows_e4m3(x)).to(x.dtype),) + tuple(args[1:])

        self.saved, self.hooks = [], []
        with torch.no_grad():
            for layer in self.layers:
                self.saved.append(layer.weight.detach().clone())
                layer.weight.copy_(dequantize(*quantize_rows_e4m3(layer.weight)).to(layer.weight.dtype))
                self.hooks.append(layer.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for layer, w in zip(self.layers, self.saved):
                layer.weight.copy_(w)
        for h in self.hooks:
            h.remove()


def _preset(lora_dir) -> str | None:
    f = Path(lora_dir) / "rtlynx_config.json"
    return json.loads(f.read_text()).get("config", {}).get("preset") if f.is_file() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(emoji64.DEFAULT_PATH))
    ap.add_argument("--inception", default=str(F.DEFAULT_INCEPTION))
    ap.add_argument("--prompts-file", default=None, help="prompts, one a line, when --data is not here")
    ap.add_argument("--reference-features", default=None,
                    help="npz cache of the Emoji-64 Inception features (read if present, else written)")
    ap.add_argument("--model-dir", default=str(ASSET_DIR))
    ap.add_argument("--lora-dir", default=str(demo.LORA_DIR))
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=list(demo.VARIANTS), choices=list(ALL_VARIANTS),
                    help="also: " + ", ".join([*FP8_VARIANTS, *SCHEDULE_VARIANTS]))
    ap.add_argument("--out", default=str(RESULTS / "quality.json"))
    ap.add_argument("--dense-images", default=None,
                    help="an .npz of this protocol's dense images: reused if it matches, else written (module doc)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="sampling dtype (all variants)")
    ap.add_argument("--dense-below-t", type=float, default=None,
                    help="run the sparse variants dense on the final steps (noise level t below this)")
    ap.add_argument("--backend", choices=["reference", "lynx", "cusparselt", "auto"], default="reference",
                    help="backend of the sparse variants")
    ap.add_argument("--attention", default=None,
                    help="diffusers attention backend of every variant (default: SDPA); see the module docstring")
    args = ap.parse_args(argv)

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/quality.py needs a CUDA GPU (FID over 5000 images); --device cpu for a smoke run")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = load_miniflux(args.model_dir, device=dev, dtype=dtype)
    has_lora = demo.prepare(model, Path(args.lora_dir), backend=args.backend)
    # keep_dense_weights: the FP8 variant must not replace the bf16 weights the other variants run on
    api.configure(model.transformer, dense_below_t=args.dense_below_t, keep_dense_weights=True)
    variants = [v for v in args.variants if has_lora or not v.startswith("rtlynx")]
    centre = api.config_of(model.transformer).centre  # the LoRA's; the naive baselines run without (variant_settings)
    if args.attention:
        model.transformer.set_attention_backend(args.attention)  # an unknown or uninstalled one fails here, first
        if "dense" in variants:
            variants = ["dense_sdpa", *variants]
    t0 = time.time()
    if Path(args.data).is_file():
        data = emoji64.load(args.data)
        all_prompts = data["prompts"]
    else:  # prompts only (the images are needed for FID alone)
        data, all_prompts = None, Path(args.prompts_file).read_text().splitlines()
    net, real, fid_note = None, None, None
    cache = Path(args.reference_features) if args.reference_features else None
    have_inception = Path(args.inception).is_file() or Path(args.inception + ".part0").is_file()
    if have_inception and (data is not None or (cache is not None and cache.is_file())):
        net = F.load_inception(args.inception, dev)
        real = F.reference_features(net, args.data, cache)
    else:
        fid_note = (f"FID/KID skipped: needs the Inception ({args.inception}) and either the data ({args.data}) "
                    f"or cached reference features ({cache})")
        print(fid_note)
    prompts = F.fid_prompts(all_prompts, args.n, args.seed)
    steps = args.steps or model.config["num_steps"]

    images, out = {}, {}
    dense_cache, cached = Path(args.dense_images) if args.dense_images else None, None
    with torch.no_grad():  # the protocol the dense images belong to, weights included
        weights = sum(float(p.double().sum()) for n, p in model.transformer.named_parameters() if "lora_" not in n)
    key = hashlib.sha256(json.dumps([prompts, args.seed, steps, args.dtype, model.config["guidance_scale"],
                                     repr(weights)]).encode()).hexdigest()[:16]
    if dense_cache is not None and dense_cache.is_file():
        with np.load(dense_cache) as z:
            if str(z["key"]) == key:
                cached = z["images"]
            else:
                print(f"--dense-images {dense_cache}: made with another protocol; regenerating (and overwriting it)")
    if cached is not None and "dense" not in variants:
        images["dense"] = cached  # paired against, no dense row
    for name in variants:
        api.configure(model.transformer, **demo.variant_settings(
            {"dtype": "native", "dense_below_t": args.dense_below_t, **{**ALL_VARIANTS, **SDPA_VARIANT}[name][1]},
            centre))
        if args.attention:
            model.transformer.set_attention_backend("native" if name == "dense_sdpa" else args.attention)
        t1 = time.time()
        if name == "dense" and cached is not None:
            images[name] = cached
        elif name == "dense_fp8":
            with _DenseFP8(model.transformer):
                images[name] = F.generate(model, prompts, args.batch_size, args.seed, num_steps=steps)
        else:
            images[name] = F.generate(model, prompts, args.batch_size, args.seed, num_steps=steps)
        gen_s = time.time() - t1
        row = {"seconds_generate": gen_s}
        if name == "dense" and dense_cache is not None:
            if cached is not None:
                row["dense_images"] = str(dense_cache)  # scored from the kept images, not regenerated
            else:
                dense_cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(dense_cache, images=images[name], key=key)
        if net is not None:
            feats = F.inception_features(net, images[name])
            kid, kid_std = F.kid_from_features(feats, real)
            row.update(fid=F.fid_from_features(feats, real), kid=kid, kid_std=kid_std)
        if name != "dense" and "dense" in images:
            pair = F.paired_metrics(images[name], images["dense"])
            row.update(psnr=pair["psnr"], ssim=pair["ssim"])
        elif name == "dense":
            row.update(psnr=None, ssim=1.0)  # against itself: PSNR infinite (JSON has no inf), SSIM 1
        if name != "dense_sdpa" and "dense_sdpa" in images:
            pair = F.paired_metrics(images[name], images["dense_sdpa"])
            same = not math.isfinite(pair["psnr"])  # identical images: JSON has no inf
            row.update(psnr_vs_sdpa=None if same else pair["psnr"], ssim_vs_sdpa=pair["ssim"])
        out[name] = row
        print(f"{name:12s} " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items() if v is not None), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # row by row: a run cut short keeps what it did
        Path(args.out).write_text(json.dumps({"partial": True, "device": torch.cuda.get_device_name(0) if dev == "cuda"
                                              else "cpu", "n_generated": args.n, "variants": out}, indent=1))

    summary = {}
    if {"dense", "act24", "rtlynx"} <= set(out):
        summary["rtlynx_psnr_gain_over_act24_db"] = out["rtlynx"]["psnr"] - out["act24"]["psnr"]
        if "weight24" in out:
            summary["weight24_is_worst_psnr"] = min((v for v in out if v != "dense"), key=lambda v: out[v]["psnr"]) == "weight24"
        if net is not None:
            gap = out["act24"]["fid"] - out["dense"]["fid"]
            summary["fid_gap_closed"] = (out["act24"]["fid"] - out["rtlynx"]["fid"]) / gap if gap else None
            summary["rtlynx_fid_over_dense"] = out["rtlynx"]["fid"] / out["dense"]["fid"]
            if "weight24" in out:
                summary["weight24_is_worst_fid"] = max(out, key=lambda v: out[v]["fid"]) == "weight24"
    if {"rtlynx", "rtlynx_fp8"} <= set(out):
        if net is not None:
            summary["fid_fp8_over_bf16_rtlynx"] = out["rtlynx_fp8"]["fid"] / out["rtlynx"]["fid"]
        if "dense" in out:
            summary["psnr_fp8_minus_bf16_rtlynx_db"] = out["rtlynx_fp8"]["psnr"] - out["rtlynx"]["psnr"]
    result = {**run_metadata(), "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "model": "mini-FLUX (rtlynx/assets/miniflux)",
              "n_generated": args.n, "n_reference": None if real is None else len(real), "steps": steps,
              "fid_note": fid_note,
              "guidance_scale": model.config["guidance_scale"], "seed": args.seed, "backend": args.backend, "dtype": args.dtype,
              "dense_below_t": args.dense_below_t, "attention": args.attention or "native",
              "preset": _preset(args.lora_dir), "layers_sparse": len(api.sparse_layers(model.transformer)),
              "lora": json.loads((Path(args.lora_dir) / "distill_report.json").read_text())["rank"]
              if has_lora and (Path(args.lora_dir) / "distill_report.json").is_file() else None,
              "variants": out, "summary": summary, "seconds_total": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    k = 8
    demo.sheet({v: (torch.from_numpy(images[v][:k]), 0.0) for v in variants}, prompts[:k],
               Path(args.out).with_name(Path(args.out).stem + "_sheet.png"),
               labels={k: v[0] for k, v in {**ALL_VARIANTS, **SDPA_VARIANT}.items()},
               title=f"mini-FLUX, {steps} steps (quality benchmark)"
               + (f", dense for t < {args.dense_below_t}" if args.dense_below_t else ""))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
