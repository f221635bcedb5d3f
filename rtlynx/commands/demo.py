"""`rtlynx demo`: the five variants on the shipped mini-FLUX, side by side, with paired metrics."""

from __future__ import annotations

import json
from pathlib import Path

from ..validate import arg_int, arg_t
from . import help_of
from .generate import hidden_alias, schedule_line


def run(args) -> int:
    import torch

    from .. import demo, validate
    from ..api import config_of, configure
    from ..backends import lynx_status
    from ..benchtools import run_metadata
    from ..models.miniflux import ASSET_DIR, load_miniflux

    meta = run_metadata()  # the code as it was when the run started
    try:
        dev = validate.device("--device", args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as e:
        raise SystemExit(f"rtlynx demo: {e}") from None
    print(f"loading the mini-FLUX and its LoRA on {dev}...", flush=True)
    try:
        # bf16 on GPUs, the dtype the fused kernels (and cuSPARSELt) run
        model = load_miniflux(ASSET_DIR if args.model == "miniflux" else args.model, device=dev,
                              dtype=torch.float32 if dev == "cpu" else torch.bfloat16)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"rtlynx demo: {e}")
    if args.lynx is not None and not Path(args.lynx).is_dir():
        raise SystemExit(f"rtlynx demo: --lynx {args.lynx} is not a folder (an rtlynx.save folder, e.g. from "
                         "`rtlynx train-lora`)")
    try:
        # the shipped LoRA fits the shipped model only; another model gets its LoRA from --lynx
        lora_dir = Path(args.lynx) if args.lynx else (demo.LORA_DIR if args.model == "miniflux" else None)
        has_lora = demo.prepare(model, lora_dir,
                                backend="auto" if dev != "cpu" else "reference", required=args.lynx is not None)
        if args.dense_below_t != "config":
            configure(model.transformer, dense_below_t=None if args.dense_below_t == "none" else args.dense_below_t)
        if args.sparse_dtype != "native":
            configure(model.transformer, dtype=args.sparse_dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"rtlynx demo: {e}") from None
    schedule = config_of(model.transformer)
    dense_below_t = schedule.dense_below_t if schedule else None
    print(schedule_line(dense_below_t, args.dense_below_t, "the LoRA's saved schedule"))
    variants = [v for v in demo.VARIANTS if has_lora or v != "rtlynx"]
    if not has_lora:
        print("note: no distilled LoRA found; the RT-Lynx variant is skipped (run `rtlynx train-lora`)")
    # On a CPU, half the prompt set keeps the five variants to a few minutes.
    prompts = args.prompt or demo.DEMO_PROMPTS[: args.num_prompts or (8 if dev != "cpu" else 4)]
    out = demo.fresh_dir(Path(args.out), args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    print(f"sampling {len(prompts)} prompts x {len(variants)} variants, {args.steps} steps each "
          f"(+ {demo.WARMUP_STEPS} untimed warm-up steps per variant)", flush=True)
    results = demo.generate_variants(model, prompts, variants, seed=args.seed, num_steps=args.steps)
    metrics = demo.paired_metrics(results)
    sheet = demo.sheet(results, prompts, out / "sheet.png",
                       title=f"mini-FLUX, {args.steps} steps, seed {args.seed}, device {dev}"
                       + (", FP8 e4m3" if args.sparse_dtype == "fp8" else "")
                       + (f", dense for t < {dense_below_t}" if dense_below_t else ""))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    backend = "reference" if dev == "cpu" else ("lynx" if lynx_status()[0] else "auto (no lynx: cuSPARSELt)")
    if args.sparse_dtype == "fp8":
        backend = "reference (FP8 emulated)" if dev == "cpu" else backend + " (FP8 sites where the kernels run)"
    (out / "metrics.json").write_text(json.dumps({**meta, "device": dev, "dtype": dtype,
                                                  "sparse_dtype": args.sparse_dtype, "backend": backend,
                                                  "steps": args.steps, "seed": args.seed, "dense_below_t": dense_below_t,
                                                  "prompts": prompts,
                                                  "command": " ".join(["rtlynx", *getattr(args, "argv", ["demo"])]),
                                                  "variants": metrics}, indent=1))
    print(demo.table(metrics))
    print(f"wrote {sheet} and {out / 'metrics.json'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help=help_of("demo"))
    p.add_argument("--out", default="rtlynx-demo", help="output directory (a fresh -N suffix if it is taken)")
    p.add_argument("--overwrite", action="store_true", help="reuse --out even if it holds files")
    p.add_argument("--steps", type=arg_int(1), default=20, help="sampling steps per image")
    p.add_argument("--seed", type=arg_int(0), default=0, help="seed of the start noise (shared by every variant)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable; none: a fixed set)")
    p.add_argument("--num-prompts", type=arg_int(1), default=None,
                   help="how many of the fixed set (default: 8 on a GPU, 4 on a CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda[:i] or auto (cuda when available)")
    p.add_argument("--model", default="miniflux", help="MiniFlux directory, or miniflux for the shipped mini-FLUX")
    p.add_argument("--lynx", default=None,
                   help="rtlynx.save directory with the distilled LoRA (default: the shipped one)")
    p.add_argument("--dense-below-t", type=arg_t, default="config", metavar="T|none|config",
                   help="run the final steps (noise level t < T) dense; config: the LoRA config's value")
    p.add_argument("--sparse-dtype", default="native", choices=("native", "fp8"),
                   help="fp8: kept activations and weights in float8 e4m3 (FP8 sparse kernels on sm_90, else emulated)")
    # the names of rtlynx 0.1, kept for a release
    hidden_alias(p, "--model-dir", "model")
    hidden_alias(p, "--lora-dir", "lynx")
    hidden_alias(p, "--dtype", "sparse_dtype", choices=("native", "fp8"))
    p.set_defaults(func=run)
