"""Make a measured compensation LoRA the shipped one (rtlynx/assets/miniflux-lynx, what `rtlynx demo` loads).

The source folder is loaded into the shipped mini-FLUX first (the checksum, the layer names and shapes all checked by
`rtlynx.load`), then written back with `rtlynx.save` under the settings a user of the asset wants: backend "auto"
(the source may name the GPU kernels it was trained on) and the step schedule given here. Its `distill_report.json`
(the training's own record) comes along; the asset's README.md is the hand-written model card and is left alone.

    python benchmarks/ship_lora.py benchmarks/results/centre_global500_h100_lora --overwrite
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx

from rtlynx import api, io  # noqa: E402
from rtlynx.demo import LORA_DIR  # noqa: E402
from rtlynx.models.miniflux import load_miniflux  # noqa: E402
from rtlynx.validate import arg_t  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="an rtlynx.save folder of the mini-FLUX")
    ap.add_argument("--out", default=str(LORA_DIR))
    ap.add_argument("--dense-below-t", type=arg_t, default=0.2, metavar="T|none|config",
                    help="the schedule saved with it (none: every step sparse; config: the source's)")
    ap.add_argument("--overwrite", action="store_true", help="replace the LoRA already at --out")
    args = ap.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    if src.resolve() == out.resolve():
        raise SystemExit("ship_lora.py: the source is the destination")
    t = load_miniflux().transformer
    io.load(t, src)
    if args.dense_below_t != "config":
        api.configure(t, dense_below_t=None if args.dense_below_t == "none" else args.dense_below_t)
    api.configure(t, backend="auto")
    try:
        io.save(t, out, overwrite=args.overwrite)
    except FileExistsError as e:
        raise SystemExit(f"ship_lora.py: {e} (pass --overwrite)") from None
    if (src / "distill_report.json").is_file():
        shutil.copyfile(src / "distill_report.json", out / "distill_report.json")
    cfg = api.config_of(t)
    print(f"wrote {out} from {src}: {len(api.sparse_layers(t))} layers, centre {cfg.centre}, "
          f"dense_below_t {cfg.dense_below_t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
