"""CPU N:M mask selection: the pairwise compare (rtlynx.reference.nm._mask_pairs, what the CPU reference path runs)
against top-k and the m-pass compare, on FLUX-like activation shapes; best of 5 after a warm-up. A speed figure, not
a test (tests/test_nm_pairs.py checks that the masks are identical).

    python benchmarks/cpu_mask.py [--out benchmarks/results/cpu_mask.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx

from rtlynx.benchtools import run_metadata  # noqa: E402
from rtlynx.reference import nm  # noqa: E402


def best(fn, bits, reps=5) -> float:
    fn(bits, 2, 4)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(bits, 2, 4)
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu_mask.json"))
    args = ap.parse_args(argv)
    rows = []
    print(f"{'M x K':>12s} {'pairs ms':>9s} {'top-k ms':>9s} {'compare ms':>10s} {'vs top-k':>8s}")
    for m, k in ((4096, 3072), (1024, 3072), (256, 12288)):
        bits = nm._order_bits(torch.randn(m, k, generator=torch.Generator().manual_seed(0)))
        t = {name: best(fn, bits) for name, fn in (("pairs", nm._mask_pairs), ("topk", nm._mask_topk),
                                                     ("compare", nm._mask_compare))}
        rows.append({"m": m, "k": k, **{f"{n}_ms": v * 1e3 for n, v in t.items()}, "vs_topk": t["topk"] / t["pairs"]})
        print(f"{m:>5d} x {k:<5d} {t['pairs'] * 1e3:9.1f} {t['topk'] * 1e3:9.1f} {t['compare'] * 1e3:10.1f} "
              f"{t['topk'] / t['pairs']:7.1f}x")
    Path(args.out).write_text(json.dumps({**run_metadata(), "device": "cpu", "threads": torch.get_num_threads(),
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
