"""`rtlynx train-reference`: train the dense MiniFlux model on Emoji-64."""
from __future__ import annotations

import json

from ..validate import arg_int, arg_real
from . import help_of


def register(subparsers):
    p = subparsers.add_parser("train-reference", help=help_of("train-reference"))
    from rtlynx._files import EMOJI64_PATH as DEFAULT_PATH

    p.add_argument("--data", default=str(DEFAULT_PATH), help="Emoji-64 npz ")
    p.add_argument("--out", required=True, help="output folder (ckpt.pt, ema/, loss.json, samples.png)")
    p.add_argument("--minutes", type=arg_real(0, low_open=True), required=True, help="whole-run training time; sets the lr schedule")
    p.add_argument("--session-minutes", type=arg_real(0, low_open=True), default=None, help="stop this invocation after this long")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if present")
    p.add_argument("--init", default=None, help="start from saved EMA weights (a save_pretrained folder)")
    p.add_argument("--batch-size", type=arg_int(1), default=512, help="images per optimiser step")
    p.add_argument("--lr", type=arg_real(0, low_open=True), default=8e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=arg_int(0), default=300, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=arg_real(0, 1, high_open=True), default=0.999, help="decay of the EMA weights that are saved")
    p.add_argument("--max-steps", type=arg_int(1), default=None, help="stop after this many steps (none: time only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (falls back to eager)")
    p.add_argument("--no-balance", action="store_true", help="sample images uniformly, not by identity")
    p.add_argument("--model", default="{}", help='JSON MiniFlux config overrides, e.g. \'{"width": 384}\'')
    p.add_argument("--sample-sheet", default=None, help="write a sample sheet PNG here when done")
    p.add_argument("--seed", type=arg_int(0), default=0, help="seed of the initialisation and the data order")
    p.set_defaults(func=_run)


def _run(args):
    from pathlib import Path

    from rtlynx.train.reference import TrainConfig, sample_sheet, train

    if not Path(args.data).is_file():  # one line, not a traceback from deep in the data loader
        raise SystemExit(f"rtlynx train-reference: the Emoji-64 data set {args.data} is not there: build it with "
                         "`rtlynx data emoji64` (needs npm) or pass --data FILE")
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
