"""`rtlynx train-lora --objective global`: train every compensation LoRA jointly against the dense model's output
(rtlynx.distill_global), starting from a closed-form LoRA (``--init DIR``, or ``--calib`` to solve it first), on the
states the sparse sampler reaches itself. Writes an rtlynx save to --out, its checkpoint to --out/checkpoint
(``--resume`` continues from it) and the learning curve to --out/distill_report.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..validate import arg_int, arg_rank_or_fill, arg_real


def add_args(p) -> None:
    p.add_argument("--objective", choices=["closed-form", "global"], default="closed-form",
                   help="closed-form: each layer's LoRA from its statistics; global: all LoRAs trained jointly "
                        "against the dense model's output, from --init or the closed form (default: closed-form)")
    p.add_argument("--init", default=None, help="global: the LoRA to start from (an rtlynx save directory)")
    p.add_argument("--prompts", "--prompts-file", dest="prompts", default=None,
                   help="global: training prompts, one a line")
    p.add_argument("--train-steps", type=arg_int(1), default=600, help="global: optimisation steps (default: 600)")
    p.add_argument("--lr", type=arg_real(0, low_open=True), default=1e-3, help="global: Adam learning rate (default: 0.001)")
    p.add_argument("--batch-rows", type=arg_int(1), default=128,
                   help="global: samples of recorded transformer calls per step (default: 128)")
    p.add_argument("--rollout-prompts", type=arg_int(1), default=64,
                   help="global: prompts per rollout of the sparse sampler (default: 64)")
    p.add_argument("--refresh", type=arg_int(1), default=50, help="global: steps between rollouts (default: 50)")
    p.add_argument("--states", choices=["student", "dense"], default="student",
                   help="global: train on the sparse sampler's states or the dense sampler's (default: student)")
    p.add_argument("--t-weight", choices=["uniform", "late", "early"], default="uniform",
                   help="global: loss weight by noise level (default: uniform)")
    p.add_argument("--target", choices=["velocity", "endpoint"], default="velocity",
                   help="global: the teacher's velocity at the student's states, or that velocity pulled toward the "
                        "dense sample of the same noise (flow-matching models: FLUX, Qwen-Image) (default: velocity)")
    p.add_argument("--endpoint-weight", type=arg_real(0), default=1.0,
                   help="global: with --target endpoint, how far the target is pulled (0-1) (default: 1.0)")
    p.add_argument("--store-device", default=None,
                   help="global: where recorded calls are kept: cpu for large models (default: the model's device)")
    p.add_argument("--resume", action="store_true", help="global: continue from --out/checkpoint (default: off)")
    p.add_argument("--train-for-schedule", action="store_true",
                   help="global: train for the step schedule saved with the LoRA (--dense-below-t): the rollouts run "
                        "it and the steps it runs dense are left out of the loss (default: off, every step sparse)")
    p.add_argument("--grow-rank", type=arg_rank_or_fill(1), default=None,
                   help="global: widen every LoRA of the start to this rank first (new B columns zero: the same "
                        "output; the training uses the new capacity); 'fill': each site to the rank that costs what "
                        "rank 8 costs on the bf16 kernels (64 // members) (default: the start's rank)")


def run(args, device, dtype, solve_closed_form) -> int:
    """``device`` / ``dtype``: the checked model options; ``solve_closed_form(transformer)``: the closed-form path of
    train-lora, used when there is no --init."""
    from .. import api, io
    from ..distill_global import DistillError, GlobalConfig, grow_lora_rank, train_global
    from ..pipelines import ModelError, adapter_fingerprint, load_runner
    from .generate import load_adapter, read_prompts, resume_adapter_error

    out = Path(args.out)
    if not args.prompts:
        raise SystemExit("rtlynx train-lora --objective global: give --prompts FILE (training prompts, one a line)")
    below = None if args.dense_below_t in ("none", "config") else args.dense_below_t  # the schedule saved
    if args.train_for_schedule and below is None:
        raise SystemExit("rtlynx train-lora --objective global: --train-for-schedule needs a schedule "
                         "(--dense-below-t T)")
    if not args.init and not args.calib:
        raise SystemExit("rtlynx train-lora --objective global: give --init DIR (a LoRA to start from) or --calib "
                         "(solve the closed form first)")
    marker = out / "checkpoint" / "adapter.json"  # the adapter a checkpoint was trained under ("null": none)
    try:
        if args.resume and marker.is_file():  # before the model loads
            now = adapter_fingerprint(args.adapter, args.adapter_scale) if args.adapter else None
            why = resume_adapter_error(out / "checkpoint", json.loads(marker.read_text()), now)
            if why:
                raise ValueError(f"{why} (or start over without --resume)")
        cfg = GlobalConfig(steps=args.train_steps, lr=args.lr, batch=args.batch_rows,
                           rollout_prompts=args.rollout_prompts, refresh=args.refresh, states=args.states,
                           t_weight=args.t_weight, seed=args.seed, target=args.target,
                           endpoint_weight=args.endpoint_weight,
                           dense_below_t=below if args.train_for_schedule else None)
        prompts = read_prompts(args.prompts)
        runner = load_runner(args.model, device=device, dtype=dtype)
        adapter = load_adapter(runner, args)  # trained against dense + adapter on the sparse + adapter sampler
        if args.init:
            io.load(runner.transformer, args.init, dense_below_t=None, dense_above_t=None)
        else:
            solve_closed_form(runner.transformer)
            api.configure(runner.transformer, dense_below_t=None, dense_above_t=None)
        if args.grow_rank:  # a resumed run grows the same way: its checkpoint holds the grown factors
            print(f"LoRA rank {args.grow_rank} on {grow_lora_rank(runner.transformer, args.grow_rank, args.seed)} "
                  "layers")

        def rollout(batch, seed):
            return runner.sample(batch, steps=args.steps, guidance=args.guidance, height=args.height,
                                 width=args.width, seed=seed, latent=True)

        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(adapter))
        report = train_global(runner.transformer, rollout, prompts, cfg, checkpoint=out / "checkpoint",
                              resume=args.resume, store_device=args.store_device)
    except (ModelError, ValueError, FileNotFoundError, DistillError) as e:
        raise SystemExit(f"rtlynx train-lora: {e}") from None
    # the step schedule saved with the LoRA (--dense-below-t; the training ran it only with --train-for-schedule)
    api.configure(runner.transformer, dense_below_t=below)
    io.save(runner.transformer, out, overwrite=True, provenance={"adapter": adapter})
    (out / "distill_report.json").write_text(json.dumps({"objective": "global", "model": args.model,
                                                          "init": args.init, "adapter": adapter, **report}, indent=1))
    print(f"wrote {out}")
    return 0
