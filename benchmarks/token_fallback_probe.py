"""Token fallback probe (issue 18): run the few tokens that 2:4 hurts most dense, the rest sparse.

The pruning error is per token: a token whose channels are flat loses half its energy to top-2-of-4, one with a few
large channels almost nothing. If the quality loss comes from a small share of tokens, computing those rows dense
(a gather, a dense GEMM of k rows, a scatter: k/M of the dense FLOPs on top of the sparse GEMM) may buy much of the
quality back for little speed. This probe emulates it on the reference math with forward hooks on the shipped
mini-FLUX (CPU): in every call of every sparse layer, the fraction ``f`` of rows with the lowest retained energy
``|x~|^2 / |x|^2`` get the exact dense output, the others RT-Lynx's (norm scale + the shipped LoRA). A control picks
the same number of rows at random. Paired PSNR / SSIM against dense on held-out prompts (same noise).

    python benchmarks/token_fallback_probe.py [--prompts-file .cache/prompts_all.txt] [--n 16 --steps 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # rtlynx; benchmarks

from rtlynx import api  # noqa: E402
from rtlynx.benchtools import add_row, run_metadata  # noqa: E402
from rtlynx.eval import fid as F  # noqa: E402
from rtlynx.models.miniflux import to_uint8  # noqa: E402
from rtlynx.nn import SparseActLinear  # noqa: E402
from rtlynx.reference import nm as R  # noqa: E402

from centering_probe import shipped_sparse_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Fallback:
    """Forward hooks replacing each sparse layer's (dense-mode) output by RT-Lynx's, with a share of rows dense."""

    def __init__(self, layers: dict[str, SparseActLinear], seed: int = 0):
        self.frac, self.pick, self.active = 0.0, "worst", False
        self.gen = torch.Generator().manual_seed(seed)
        self.dense_rows = self.rows = 0
        for m in layers.values():
            m.register_forward_hook(lambda mod, a, out: self.hook(mod, a[0], out))

    def hook(self, m, x, out):
        if not self.active:
            return out
        x2 = x.float().reshape(-1, x.shape[-1])
        w = m.weight.float()
        xp = torch.where(R.nm_mask(x2, 2, 4), x2, torch.zeros_like(x2))
        y = (xp * R.norm_scale(x2, xp)[:, None]) @ w.T + (x2 @ m.lora_A.float().T) @ m.lora_B.float().T
        k = round(self.frac * x2.shape[0])
        if k:
            if self.pick == "worst":
                kept = xp.pow(2).sum(1) / x2.pow(2).sum(1).clamp_min(1e-30)
                rows = kept.topk(k, largest=False).indices
            else:
                rows = torch.randperm(x2.shape[0], generator=self.gen)[:k]
            y[rows] = x2[rows] @ w.T
        self.dense_rows += k
        self.rows += x2.shape[0]
        if m.bias is not None:
            y = y + m.bias.float()
        return y.reshape(*x.shape[:-1], -1).to(out.dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts-file", default=".cache/prompts_all.txt")
    ap.add_argument("--n", type=int, default=16, help="held-out prompts for paired PSNR / SSIM")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.25])
    ap.add_argument("--control", type=float, default=0.1, help="the fraction also run with random rows")
    ap.add_argument("--out", default=str(RESULTS / "token_fallback_probe_cpu.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, layers = shipped_sparse_model()
    held = Path(args.prompts_file).read_text().splitlines()[200:200 + args.n]  # centering_probe.py's held-out slice
    probe, t0 = Fallback(layers), time.time()
    out = {**run_metadata(), "model": "shipped mini-FLUX and its LoRA, 60 sparse layers, reference math (hooks)",
           "n_held_out": args.n, "steps": args.steps, "rows": []}
    with api.dense_mode(model.transformer):
        ref = to_uint8(model.sample(held, num_steps=args.steps, seed=0))
        runs = [("worst", f) for f in args.fracs] + ([("random", args.control)] if args.control else [])
        for pick, frac in runs:
            probe.active, probe.pick, probe.frac, probe.dense_rows, probe.rows = True, pick, frac, 0, 0
            img = to_uint8(model.sample(held, num_steps=args.steps, seed=0))
            probe.active = False
            row = {"rows": pick, "dense_fraction": frac, "dense_rows_share": probe.dense_rows / max(probe.rows, 1),
                   **F.paired_metrics(img.numpy(), ref.numpy())}
            add_row(out, row, args.out, t0,
                    f"{pick:6s} f={frac:.2f}  PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.3f}")
    print(f"wrote {args.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
