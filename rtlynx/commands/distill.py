"""`rtlynx calibrate` and `rtlynx train-lora`: distil the LoRA compensation of the mini-FLUX.

calibrate: sample with the dense model on dataset prompts and stream every sparse layer's
sufficient statistics into a file (resumable: more prompts add to it). train-lora: solve each layer's
LoRA in closed form from those statistics (see rtlynx.distill) and save it with rtlynx.save.
"""

from __future__ import annotations

import json
from pathlib import Path


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_model(args):
    from ..models.miniflux import ASSET_DIR, load_miniflux

    return load_miniflux(args.model_dir or ASSET_DIR, device=_device(args.device))


def calibration_prompts(args) -> list[str]:
    """The prompts to calibrate on: --prompts-file, else a draw from Emoji-64. A missing source ends the command
    with one line naming both ways out."""
    import numpy as np

    if args.prompts_file:
        try:
            prompts = [p.strip() for p in Path(args.prompts_file).read_text().splitlines() if p.strip()]
        except OSError as e:
            raise SystemExit(f"rtlynx calibrate: cannot read --prompts-file: {e}")
        if not prompts:
            raise SystemExit(f"rtlynx calibrate: {args.prompts_file} holds no prompts")
        return prompts[: args.num_prompts]
    from ..data import emoji64

    path = Path(args.data) if args.data else emoji64.DEFAULT_PATH
    try:
        data = emoji64.load(path)
    except (OSError, ValueError) as e:
        why = "not found" if isinstance(e, FileNotFoundError) else f"unreadable ({e})"
        raise SystemExit(f"rtlynx calibrate: the Emoji-64 prompts ({path}) are {why}: build them with "
                         f"`rtlynx data emoji64{'' if path == emoji64.DEFAULT_PATH else f' --out {path}'}` (needs npm) "
                         "or pass --prompts-file FILE (one prompt a line)")
    rng = np.random.default_rng(args.seed)
    w = emoji64.identity_weights(data["identity"])
    idx = rng.choice(len(data["prompts"]), size=args.num_prompts, p=w / w.sum())
    return [str(data["prompts"][i]) for i in idx]


def run_calibrate(args) -> int:
    from tqdm.auto import tqdm

    from .. import api, distill

    out = Path(args.out)
    if out.exists() and not (args.resume or args.overwrite):
        raise SystemExit(f"{out} exists: pass --resume to add prompts to it or --overwrite to start over")
    prompts = calibration_prompts(args)  # before the model loads: a missing data set fails at once
    print(f"loading the model on {_device(args.device)}...", flush=True)
    model = _load_model(args)
    api.sparsify(model.transformer, preset=args.preset)
    stats, done = None, 0
    if args.resume and out.exists():
        stats = distill.CalibStats.load(out, device=model.img_ids.device)
        done = stats.meta.get("prompts_done", 0)
        print(f"resuming {out}: {done} prompts already in it")
    for i in tqdm(range(done, len(prompts), args.batch_size), desc="calibrate", unit="batch",
                  initial=done // args.batch_size, total=-(-len(prompts) // args.batch_size)):
        batch = prompts[i: i + args.batch_size]
        stats = distill.collect(model.transformer, lambda: model.sample(
            batch, num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed + i,
            progress=f"{len(batch)} prompts"), stats)
        stats.meta.update(prompts_done=i + len(batch), steps=args.steps, preset=args.preset, seed=args.seed)
        stats.save(out, overwrite=True)  # after every batch: an interrupted run resumes from here
    print(f"wrote {out}: {len(stats.layers)} layers, {stats.meta['prompts_done']} prompts")
    return 0


def run_train_lora(args) -> int:
    from .. import api, distill, io

    out = Path(args.out)
    if (out / io.CONFIG_FILE).exists() and not args.overwrite:
        raise SystemExit(f"{out} already holds an rtlynx save; pass --overwrite to replace it")
    model = _load_model(args)
    stats = distill.CalibStats.load(args.calib, device=model.img_ids.device)
    val = distill.CalibStats.load(args.val, device=model.img_ids.device) if args.val else None
    # Each layer's LoRA depends on its own statistics only, so a narrower preset than the calibration's
    # gives exactly the same LoRA for the layers it keeps.
    api.sparsify(model.transformer, preset=args.preset or stats.meta.get("preset", "auto"), lora_rank=args.rank)
    rows = distill.fit_lora(model.transformer, stats, args.rank, ridge=args.ridge, val=val)
    io.save(model.transformer, out, overwrite=args.overwrite)
    (out / "distill_report.json").write_text(json.dumps({"rank": args.rank, "ridge": args.ridge,
                                                          "calib": stats.meta, "layers": rows}, indent=1))
    keys = [k for k in ("err_norm", "err_lora", "val_err_norm", "val_err_lora") if k in rows[0]]
    print("mean relative layer-output error: " + ", ".join(
        f"{k} {sum(r[k] for r in rows) / len(rows):.4f}" for k in keys))
    print(f"wrote {out}")
    return 0


def _common(p) -> None:
    p.add_argument("--model-dir", default=None, help="MiniFlux directory (none: the shipped model)")
    p.add_argument("--device", default="auto", help="cpu, cuda[:i] or auto (cuda when available)")


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="stream dense-trajectory layer statistics for LoRA distillation")
    _common(p)
    p.add_argument("--data", default=None, help="Emoji-64 npz (none: where `rtlynx data emoji64` writes it)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line, instead of the dataset")
    p.add_argument("--num-prompts", type=int, default=1024, help="prompts to sample (drawn from the data set)")
    p.add_argument("--batch-size", type=int, default=128, help="prompts sampled together (one save per batch)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps per prompt")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (none: the model's)")
    p.add_argument("--preset", default="flux", help="which layers to collect statistics for (rtlynx.presets)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt draw and the start noise")
    p.add_argument("--out", required=True, help="statistics file (.safetensors)")
    p.add_argument("--resume", action="store_true", help="add the remaining prompts to an existing file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_calibrate)

    p = sub.add_parser("train-lora", help="solve every sparse layer's LoRA from calibration statistics")
    _common(p)
    p.add_argument("--calib", required=True, help="statistics file written by `rtlynx calibrate`")
    p.add_argument("--val", default=None, help="held-out statistics to report generalisation")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank per layer")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge, relative to the mean input power")
    p.add_argument("--preset", default=None, help="layers to give a LoRA (none: the calibration's preset)")
    p.add_argument("--out", required=True, help="output directory (rtlynx.save format)")
    p.add_argument("--overwrite", action="store_true", help="replace an rtlynx save already in --out")
    p.set_defaults(func=run_train_lora)
