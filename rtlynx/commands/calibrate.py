"""`rtlynx calibrate` and `rtlynx train-lora`: distil the LoRA compensation of any supported model.

calibrate: sample with the dense pipeline (a local FLUX / Qwen-Image / Z-Image directory, or the shipped
mini-FLUX) on a prompts file and stream every sparse layer's sufficient statistics (rtlynx.distill: one Gram per
activation site) into a file. Resumable: the statistics are saved after every --save-every batches and a rerun
with --resume skips the prompts already in them. With --max-stats-gb the sites are split over passes that each
hold at most that much (each pass samples the same prompts with the same seeds); the output is then a directory
of pass-N.safetensors. train-lora: solve each layer's LoRA in closed form, reading one activation site's
statistics at a time (its peak memory is the largest site's, not the sum), and save it with rtlynx.save.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..validate import arg_int, arg_real, arg_t
from . import help_of, train_global
from .generate import (add_centre_arg, add_model_args, add_old_names, centre_of, hidden_alias, load_adapter,
                       read_prompts, resume_adapter_error, torch_dtype)


def calibration_prompts(args) -> list[str]:
    import numpy as np

    if args.prompts:
        return read_prompts(args.prompts)[: args.num_prompts]
    from ..data import emoji64

    if args.model != "miniflux":
        raise SystemExit("rtlynx calibrate: give --prompts (one prompt per line) for this model")
    path = Path(args.data) if args.data else emoji64.DEFAULT_PATH
    try:
        data = emoji64.load(path)
    except (OSError, ValueError) as e:  # one line naming both ways out, no traceback
        why = "not found" if isinstance(e, FileNotFoundError) else f"unreadable ({e})"
        raise SystemExit(f"rtlynx calibrate: the Emoji-64 prompts ({path}) are {why}: build them with "
                         f"`rtlynx data emoji64{'' if path == emoji64.DEFAULT_PATH else f' --out {path}'}` (needs npm) "
                         "or pass --prompts-file FILE (one prompt a line)")
    rng = np.random.default_rng(args.seed)
    w = emoji64.identity_weights(data["identity"])
    idx = rng.choice(len(data["prompts"]), size=args.num_prompts or 1024, p=w / w.sum())
    return [str(data["prompts"][i]) for i in idx]


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _model_args(args):
    """(device or None for auto, dtype or None) from the shared options."""
    return _device(getattr(args, "command", None) or "calibrate", "--device", args.device), torch_dtype(args.dtype)


def _device(command: str, flag: str, spec: str):
    from .. import validate

    try:
        return validate.device(flag, spec)
    except ValueError as e:
        raise SystemExit(f"rtlynx {command}: {e}") from None


# What a resumed calibration must share with the statistics it adds to (the prompts are checked by their digest).
RESUME_KEYS = ("model", "steps", "guidance", "height", "width", "preset", "seed", "centre")


def adapter_of(meta: dict) -> dict | None:
    """The adapter fingerprint calibrate recorded in statistics' metadata (None: none was active)."""
    text = meta.get("adapter", "none")
    return None if text in (None, "none") else json.loads(text)


def check_resume(out: Path, args, prompts: list[str], adapter: dict | None = None) -> None:
    """``--resume`` adds to statistics made with the same settings and the same first prompts, or stops with one
    line naming what differs."""
    from .. import distill

    parts = distill.stats_parts(out) if out.is_dir() else [out]
    for part in parts:
        try:
            meta = distill.StatsFiles(part).meta
        except (OSError, KeyError, ValueError) as e:
            raise SystemExit(f"rtlynx calibrate: cannot resume {part}: {e}") from None
        for key in RESUME_KEYS:
            if key in meta and meta[key] != (str(args.model) if key == "model" else getattr(args, key)):
                raise SystemExit(f"rtlynx calibrate: {part} was made with --{key} {meta[key]}, not "
                                 f"{getattr(args, key)}; resume with the same settings (or --overwrite)")
        why = resume_adapter_error(part, adapter_of(meta), adapter)
        if why:
            raise SystemExit(f"rtlynx calibrate: {why} (or --overwrite)")
        done = meta.get("prompts_done", 0)
        if meta.get("prompts_sha") != prompts_digest(prompts[:done]):
            raise SystemExit(f"rtlynx calibrate: {part} was made from other prompts than the first {done} of "
                             "this prompts file; use the same file (or --overwrite)")


def _pass_paths(out: Path, passes: int) -> list[Path]:
    return [out] if passes == 1 else [out / f"pass-{i + 1:03d}.safetensors" for i in range(passes)]


def run_calibrate(args) -> int:
    from tqdm.auto import tqdm

    from .. import api, distill
    from ..pipelines import ModelError, adapter_fingerprint, load_runner, model_kind

    try:
        model_kind(args.model)
    except ModelError as e:
        raise SystemExit(f"rtlynx calibrate: {e}") from None
    prompts = calibration_prompts(args)
    out = Path(args.out)
    if out.exists() and not (args.resume or args.overwrite or args.plan_only):
        raise SystemExit(f"rtlynx calibrate: {out} exists: pass --resume to add prompts to it or --overwrite to "
                         "start over")
    device, dtype = _model_args(args)
    stats_device = _device("calibrate", "--stats-device", args.stats_device)
    try:
        if args.resume and out.exists() and not args.plan_only:  # before the model loads and anything is written
            adapter = adapter_fingerprint(args.adapter, args.adapter_scale) if args.adapter else None
            check_resume(out, args, prompts, adapter)
        runner = load_runner(args.model, device=device, dtype=dtype)
        adapter = load_adapter(runner, args)  # before sparsify: the adapter's layers are sparsified with it kept
        api.sparsify(runner.transformer, preset=args.preset, centre=centre_of(args.centre))
    except (ModelError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rtlynx calibrate: {e}") from None
    plan = distill.plan(runner.transformer, args.max_stats_gb)
    print(plan.report())
    if args.plan_only:
        return 0
    paths = _pass_paths(out, len(plan.passes))
    if len(paths) > 1:
        out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=str(args.model), kind=runner.kind, steps=args.steps, guidance=args.guidance, height=args.height,
                width=args.width, preset=args.preset, seed=args.seed, batch_size=args.batch_size, centre=args.centre,
                adapter="none" if adapter is None else json.dumps(adapter, sort_keys=True))
    nb = -(-len(prompts) // args.batch_size)
    for p, (groups, path) in enumerate(zip(plan.passes, paths)):
        stats, done = None, 0
        if args.resume and path.exists():
            stats = distill.CalibStats.load(path, device=stats_device or runner.device)
            done = stats.meta.get("prompts_done", 0)  # settings and prompts checked by check_resume
            if done >= len(prompts):
                print(f"pass {p + 1}: all {done} prompts already in {path}")
                continue
            print(f"pass {p + 1}: resuming {path}: {done} prompts already in it")
        desc = "calibrate" + (f" pass {p + 1}/{len(paths)}" if len(paths) > 1 else "")
        for b, i in enumerate(tqdm(range(done, len(prompts), args.batch_size), desc=desc, unit="batch",
                                   initial=done // args.batch_size, total=nb)):
            batch = prompts[i: i + args.batch_size]
            stats = distill.collect(runner.transformer, lambda: runner.sample(
                batch, steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                seed=args.seed + i, latent=True), stats, groups=groups, device=stats_device)
            stats.meta.update(meta, prompts_done=i + len(batch), prompts_sha=prompts_digest(prompts[: i + len(batch)]),
                              calib_pass=p + 1, passes=len(paths))
            if (b + 1) % args.save_every == 0 or i + len(batch) >= len(prompts):
                stats.save(path, overwrite=True)  # an interrupted run resumes from the last save
    print(f"wrote {out}: {sum(len(g.layers) for p in plan.passes for g in p)} layers, {len(prompts)} prompts")
    return 0


def run_train_lora(args) -> int:
    from .. import api, distill, io
    from ..pipelines import ModelError, load_transformer

    out = Path(args.out)
    if (out / io.CONFIG_FILE).exists() and not (args.overwrite or (args.objective == "global" and args.resume)):
        raise SystemExit(f"rtlynx train-lora: {out} already holds an rtlynx save; pass --overwrite to replace it")

    def closed_form(transformer, val=None):
        # Only the headers now; fit_lora reads one site's statistics at a time (peak: the largest site)
        stats = distill.StatsFiles(args.calib)
        # Each layer's LoRA depends on its own statistics only, so a narrower preset than the calibration's
        # gives exactly the same LoRA for the layers it keeps.
        api.sparsify(transformer, preset=args.preset or stats.meta.get("preset", "auto"), lora_rank=args.rank,
                     centre=centre_of(stats.meta.get("centre", "none")))  # the LoRA fits the calibration's centring
        dev = next(transformer.parameters()).device
        return stats, distill.fit_lora(transformer, stats, args.rank, ridge=args.ridge, val=val, device=dev)

    if args.objective == "global":
        return train_global.run(args, *_model_args(args), closed_form)
    if not args.calib:
        raise SystemExit("rtlynx train-lora: give --calib (statistics from `rtlynx calibrate`)")
    if args.adapter:
        raise SystemExit("rtlynx train-lora: the closed form fits the statistics, made under calibrate's --adapter; "
                         "--adapter here applies to --objective global")
    device, dtype = _model_args(args)
    try:
        transformer = load_transformer(args.model, device=device, dtype=dtype)
        val = distill.StatsFiles(args.val) if args.val else None
        stats, rows = closed_form(transformer, val)
        if args.dense_below_t == "config":
            raise ValueError("--dense-below-t takes a noise level in (0, 1] or none")
        api.configure(transformer, dense_below_t=None if args.dense_below_t == "none" else args.dense_below_t)
    except (ModelError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rtlynx train-lora: {e}") from None
    io.save(transformer, out, overwrite=args.overwrite, provenance={"adapter": adapter_of(stats.meta)})
    (out / "distill_report.json").write_text(json.dumps({"rank": args.rank, "ridge": args.ridge, "model": args.model,
                                                          "calib": stats.meta, "layers": rows}, indent=1))
    keys = [k for k in ("err_norm", "err_lora", "val_err_norm", "val_err_lora") if k in rows[0]]
    print("mean relative layer-output error: " + ", ".join(
        f"{k} {sum(r[k] for r in rows) / len(rows):.4f}" for k in keys))
    print(f"wrote {out} (step schedule: "
          + (f"dense below t = {args.dense_below_t})" if args.dense_below_t != "none" else "every step sparse)"))
    return 0


def register(sub) -> None:
    p = sub.add_parser("calibrate", help=help_of("calibrate"))
    add_model_args(p)
    add_old_names(p, lynx=False)
    p.add_argument("--prompts-file", dest="prompts", default=None,
                   help="one prompt per line (default: Emoji-64 prompts, for the mini-FLUX only)")
    hidden_alias(p, "--prompts", "prompts")
    p.add_argument("--data", default=None, help="Emoji-64 npz for the mini-FLUX (default: the cache path of "
                                                "`rtlynx data emoji64`)")
    p.add_argument("--num-prompts", type=arg_int(1), default=None,
                   help="use the first N prompts (default: all of --prompts; 1024 from Emoji-64)")
    p.add_argument("--batch-size", type=arg_int(1), default=4, help="prompts sampled together (default: 4)")
    p.add_argument("--preset", default="auto",
                   help="layers to collect statistics for: preset name or preset file (default: auto)")
    add_centre_arg(p, "prune x minus each sample's token mean and add its exact output back (SparsityConfig.centre; "
                      "train-lora then fits and saves the LoRA for it; default: none)")
    p.add_argument("--max-stats-gb", type=arg_real(0, low_open=True), default=None,
                   help="most statistics memory per pass; more passes over the same prompts when exceeded "
                        "(default: no limit, one pass)")
    p.add_argument("--stats-device", default="auto",
                   help="where the statistics accumulate: cuda / cpu (default: auto = the model's device)")
    p.add_argument("--save-every", type=arg_int(1), default=1, help="save the statistics every N batches (default: 1)")
    p.add_argument("--plan-only", action="store_true", help="print the memory plan and exit (default: off)")
    p.add_argument("--out", required=True, help="statistics file (.safetensors); a directory when there are "
                                                "several passes")
    p.add_argument("--resume", action="store_true", help="add the remaining prompts to an existing file "
                                                         "(default: off)")
    p.add_argument("--overwrite", action="store_true", help="start over (default: off)")
    p.set_defaults(func=run_calibrate)

    p = sub.add_parser("train-lora", help=help_of("train-lora"))
    add_model_args(p)
    add_old_names(p, lynx=False)
    p.add_argument("--calib", default=None, help="statistics from `rtlynx calibrate` (file or pass directory); "
                                                 "needed unless --objective global starts from --init")
    p.add_argument("--val", default=None, help="held-out statistics to report generalisation (default: none)")
    p.add_argument("--rank", type=arg_int(1), default=16, help="LoRA rank (default: 16)")
    p.add_argument("--ridge", type=arg_real(0), default=1e-3, help="ridge, relative to the mean input power "
                                                              "(default: 0.001)")
    p.add_argument("--preset", default=None, help="layers to give a LoRA (default: the calibration's preset)")
    p.add_argument("--dense-below-t", type=arg_t, default=0.2, metavar="T|none",
                   help="step schedule saved with the LoRA: generate / demo run the final steps (noise level t < T) "
                        "dense, where pruning shows as grain (default: 0.2)")
    p.add_argument("--out", required=True, help="output directory (rtlynx.save format)")
    p.add_argument("--overwrite", action="store_true", help="replace an rtlynx save in --out (default: off)")
    train_global.add_args(p)
    p.set_defaults(func=run_train_lora)
