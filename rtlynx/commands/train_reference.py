"""`rtlynx train-reference`: train the dense MiniFlux model on Emoji-64."""
from __future__ import annotations

import json


def register(subparsers):
    p = subparsers.add_parser("train-reference", help="train the dense MiniFlux reference model")
    from rtlynx.data.emoji64 import DEFAULT_PATH

    p.add_argument("--data", default=str(DEFAULT_PATH), help="Emoji-64 npz ")
    p.add_argument("--out", required=True, help="output folder (ckpt.pt, ema/, loss.json, samples.png)")
    p.add_argument("--minutes", type=float, required=True, help="whole-run training time; sets the lr schedule")
    p.add_argument("--session-minutes", type=float, default=None, help="stop this invocation after this long")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if present")
    p.add_argument("--init", default=None, help="start from saved EMA weights (a save_pretrained folder)")
    p.add_argument("--batch-size", type=int, default=512, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=8e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=300, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the EMA weights that are saved")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (none: time only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (falls back to eager)")
    p.add_argument("--no-balance", action="store_true", help="sample images uniformly, not by identity")
    p.add_argument("--model", default="{}", help='JSON MiniFlux config overrides, e.g. \'{"width": 384}\'')
    p.add_argument("--sample-sheet", default=None, help="write a sample sheet PNG here when done")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.set_defaults(func=_run)


def _run(args):
    from rtlynx.train.reference import TrainConfig, sample_sheet, train

    try:
        model_cfg = json.loads(args.model)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--model is not valid JSON: {e}")
    cfg = TrainConfig(data=args.data, out=args.out, minutes=args.minutes, session_minutes=args.session_minutes,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      ema_decay=args.ema_decay, max_steps=args.max_steps, compile=args.compile,
                      balance=not args.no_balance, model=model_cfg, seed=args.seed)
    res = train(cfg, resume=args.resume, init=args.init)
    if args.sample_sheet:
        sample_sheet(res["model"], args.sample_sheet)
        print(f"sample sheet: {args.sample_sheet}")
    return 0
