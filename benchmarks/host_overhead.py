"""Host (CPU) cost per call of one Q/K/V site in eager mode: what a small-M layer pays before the GPU is the limit.

Three linears reading one input x [M, K] (M small, so every kernel is a few microseconds and the loop is bound by
the host): dense nn.Linear x3, the v0.1 per-layer path (fuse_sites=False: prune + GEMM per layer), and one
activation site (one prune + one GEMM, the other two layers take views). Reported: microseconds of host time per
Q/K/V triple (median of 7 loops of --iters triples, the GPU never idle-waited), and the same loop captured in a
CUDA graph (replay cost per triple). Writes benchmarks/results/host_overhead_<gpu>.json.

    python benchmarks/host_overhead.py [--m 64] [--k 3072] [--iters 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

import rtlynx
from rtlynx.benchtools import measure, run_metadata

RESULTS = Path(__file__).resolve().parent / "results"


class QKV(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(k, k) for _ in range(3))

    def forward(self, x):
        return self.to_q(x), self.to_k(x), self.to_v(x)


def host_us(fn, x, iters: int) -> float:
    with torch.no_grad():
        for _ in range(20):
            fn(x)
        torch.cuda.synchronize()
        runs = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(iters):
                fn(x)
            runs.append((time.perf_counter() - t) / iters * 1e6)  # host time to issue one triple
            torch.cuda.synchronize()
    return statistics.median(runs)


def graph_us(fn, x, iters: int) -> float:
    """Replay cost per triple of a CUDA graph holding 10 triples (rtlynx.benchtools.measure)."""
    def ten():
        for _ in range(10):
            fn(x)

    with torch.no_grad():
        return measure(ten, reps=max(1, iters // 10), warmup=1, graph=True, flush_l2=False).median_ms * 1e3 / 10


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--k", type=int, default=3072)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)
    gpu = torch.cuda.get_device_name()
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, kw in (("dense", None), ("per-layer (v0.1)", dict(fuse_sites=False)), ("site", dict())):
        m = QKV(args.k).cuda().to(torch.bfloat16).eval()
        if kw is not None:
            rtlynx.sparsify(m, preset=None, include=("to_*",), backend="lynx", speed_rules=False, **kw)
        h, g = host_us(m, x, args.iters), graph_us(m, x, args.iters)
        rows.append(dict(variant=name, host_us_per_triple=h, graph_us_per_triple=g))
        print(f"{name:18s} host {h:7.1f} us / Q,K,V   CUDA graph replay {g:7.1f} us", flush=True)
    out = RESULTS / f"host_overhead_{gpu.replace(' ', '_')}.json"
    out.write_text(json.dumps({**run_metadata(), "m": args.m, "k": args.k, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
