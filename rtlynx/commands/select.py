"""`rtlynx select`: choose the sparse sites of a model for the most speed within a quality budget and write
them as a preset file (see rtlynx.select)."""

from __future__ import annotations

from pathlib import Path

from ..validate import arg_rank_or_fill, arg_real
from . import help_of
from .generate import (add_centre_arg, add_model_args, add_old_names, centre_of, hidden_alias, load_adapter,
                       read_prompts, torch_dtype)


def run(args) -> int:
    from .. import select, validate
    from ..pipelines import ModelError, load_runner, model_kind

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"rtlynx select: {out} exists; pass --overwrite to replace it")
    prompts = read_prompts(args.prompts) if args.prompts else ["a photo"]
    centre = centre_of(args.centre)
    if args.calib and centre is not None:
        raise SystemExit("rtlynx select: --centre sets the quick measurement's centring; with --calib the statistics "
                         "carry their own (rtlynx calibrate --centre)")
    try:
        model_kind(args.model)
        if args.speed_table is None and select.device_name() is None:
            select.speed_table_for([], None)  # the one-line "no speed table on the CPU" error, before loading
        runner = load_runner(args.model, device=validate.device("--device", args.device),
                             dtype=torch_dtype(args.dtype))
        load_adapter(runner, args)  # the quick measurement samples with it
        sel = select.select_layers(runner, budget=args.budget, calib=args.calib, rank=args.rank,
                                   speed_table=args.speed_table, min_speedup=args.min_speedup,
                                   candidate_preset=args.candidates, prompts=prompts, steps=args.steps,
                                   height=args.height, width=args.width, seed=args.seed,
                                   confirm=not args.no_confirm, centre=centre)
    except (ModelError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rtlynx select: {e}") from None
    print(select.report(sel))
    if not sel["selected"]:
        raise SystemExit(f"rtlynx select: nothing selected, nothing written: {why_none(sel['candidates'], args)}")
    info = {"budget": args.budget, "rank": args.rank, "calib": args.calib, "speed_table_device": sel["table_device"],
            "candidates": sel["candidate_preset"], "min_speedup": args.min_speedup, "end_to_end": sel["end_to_end"],
            "sites": [{"layers": c.layers, "M": c.m, "K": c.k, "N": c.n, "speedup": c.speedup,
                       "saved_ms": c.saved_ms, "cost": c.cost} for c in sel["selected"]]}
    layers = [n for c in sel["selected"] for n in c.layers]
    select.write_preset_file(out, type(runner.transformer).__name__, layers, info, overwrite=args.overwrite)
    print(f"wrote {out}: use it with `rtlynx generate --preset {out}`, `rtlynx calibrate --preset {out}` "
          f"or rtlynx.sparsify(model, preset='{out}')")
    return 0


def why_none(cands, args) -> str:
    """Why no site was picked, in one line: unknown shapes, too little speed-up, or the budget."""
    unknown = [c for c in cands if c.speedup is None]
    known = [c for c in cands if c.speedup is not None]
    slow = [c for c in known if c.speedup < args.min_speedup]
    if not cands:
        return "the model has no candidate sites (check --candidates)"
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} of {len(cands)} sites have shapes the speed table does not hold (small models: "
                     "the table covers full-size shapes)")
    if slow:
        best = max(slow, key=lambda c: c.speedup)
        parts.append(f"{len(slow)} are below --min-speedup {args.min_speedup} (best {best.speedup:.2f}x at "
                     f"M={best.m}, K={best.k}, N={best.n})")
    rest = len(known) - len(slow)
    if rest:
        parts.append(f"{rest} fast enough but each over the quality budget {args.budget} (raise --budget)")
    return "; ".join(parts)


def register(sub) -> None:
    p = sub.add_parser("select", help=help_of("select"))
    add_model_args(p, steps_help="sampling steps of the quick quality measurement without --calib (default: 4)")
    p.add_argument("--calib", default=None, help="statistics from `rtlynx calibrate` for the quality costs "
                                                 "(default: a quick measurement on --prompts-file)")
    add_centre_arg(p, "without --calib: measure (and time) the sites centred, as SparsityConfig.centre")
    p.add_argument("--rank", type=arg_rank_or_fill(0), default="fill",
                   help="with --calib: cost with the closed-form LoRA of this rank, 0 for norm compensation only, "
                        "or fill: each site at 64 // its members, what rank 8 costs on the bf16 kernels (default: "
                        "fill)")
    p.add_argument("--budget", type=arg_real(0, low_open=True), default=1.0,
                   help="allowed quality cost relative to the model's default preset (default: 1.0)")
    p.add_argument("--speed-table", default=None,
                   help="speed table JSON (default: this GPU's cached table, measuring missing shapes; "
                        "required on a CPU)")
    p.add_argument("--min-speedup", type=arg_real(0, low_open=True), default=1.02,
                   help="a site must be at least this much faster sparse (default: 1.02)")
    p.add_argument("--candidates", default=None, help="preset naming the candidate layers (default: the "
                                                      "model's '-all' preset)")
    p.add_argument("--prompts-file", dest="prompts", default=None,
                   help="prompts file for the quick quality measurement (default: one prompt)")
    hidden_alias(p, "--prompts", "prompts")
    add_old_names(p, lynx=False)
    p.add_argument("--no-confirm", action="store_true",
                   help="skip the end-to-end check on the GPU (time the chosen set in the model against dense and "
                        "drop the sites of least speed-up until it is not slower; default: on)")
    p.add_argument("--out", default="rtlynx-preset.json", help="preset file to write (default: rtlynx-preset.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (default: off)")
    p.set_defaults(func=run)
