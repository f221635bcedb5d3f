"""Sparse vs dense GEMM under sustained load (GPU, sm_90): does the sparse advantage survive the power cap?

benchmarks/linear.py times each GEMM alone with cold L2 (rtlynx.benchtools.measure): the GPU idles a
little between kernels. Inside a model the GEMMs run back to back, and the end-to-end profile
(benchmarks/results/e2e_profile_log.txt) showed the lynx GEMMs at ~1.2x over cuBLAS instead of ~1.5x.
This runs each GEMM back to back for --seconds (inputs rotated beyond L2) while NVML samples the SM clock
and board power, next to the isolated time (one call per rep); the ratio column is dense / sparse.

    python benchmarks/sustained.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 3072, 12288), (4096, 12288, 3072), (4608, 15360, 3072), (4608, 3072, 3072)]  # M, K, N


class Sampler:
    """NVML SM clock (MHz) and power (W) every 20 ms on a thread."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nv = pynvml
        self.h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.samples, self.stop = [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            clk = self.nv.nvmlDeviceGetClockInfo(self.h, self.nv.NVML_CLOCK_SM)
            pw = self.nv.nvmlDeviceGetPowerUsage(self.h) / 1000
            self.samples.append((clk, pw))
            time.sleep(0.02)

    def __enter__(self):
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        self.t.join()

    def summary(self):
        s = self.samples[len(self.samples) // 4:] or self.samples  # skip the ramp
        return statistics.median(c for c, _ in s), statistics.median(p for _, p in s)


def sustained(fns, seconds):
    """Back-to-back launches cycling over fns for `seconds`; returns (ms per call, clock MHz, power W)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    calls, t0 = 0, time.perf_counter()
    with Sampler() as smp:
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        while time.perf_counter() - t0 < seconds:
            for f in fns:
                f()
            calls += len(fns)
            if calls % (8 * len(fns)) == 0:
                torch.cuda.synchronize()  # keep the queue short so the sampler sees this kernel
        b.record()
        torch.cuda.synchronize()
    clk, pw = smp.summary()
    return a.elapsed_time(b) / calls, clk, pw


def main(argv=None) -> int:
    from rtlynx.benchtools import median_ms
    from rtlynx.ops import sm90 as k90

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", default=str(RESULTS / "sustained_h100.json"))
    args = ap.parse_args(argv)
    dt = torch.bfloat16
    rows = []
    print(f"{'M x K x N':>20s} | {'isolated dense/sparse':>22s} | {'sustained dense/sparse':>23s} | "
          f"{'clock MHz d/s':>13s} | {'power W d/s':>11s}")
    for m, k, n in SHAPES:
        nin = max(2, -(-200_000_000 // (m * k * 2 + n * k * 2)))
        xs = [torch.randn(m, k, device="cuda", dtype=dt) for _ in range(nin)]
        ws = [torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5 for _ in range(nin)]
        packed = [k90.prune_compress_sm90(x, None, False, 1e-8) for x in xs]
        dense = [lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, ws)]
        sparse = [lambda p=p, w=w: k90.sparse_gemm_sm90(p[0], p[1], w, None, None) for p, w in zip(packed, ws)]
        iso_d, iso_s = median_ms(dense), median_ms(sparse)  # isolated: one call per rep, inputs rotated
        sd = sustained(dense, args.seconds)
        ss = sustained(sparse, args.seconds)
        flop = 2 * m * k * n
        row = dict(m=m, k=k, n=n, isolated_dense_ms=iso_d, isolated_sparse_ms=iso_s, isolated_ratio=iso_d / iso_s,
                   sustained_dense_ms=sd[0], sustained_sparse_ms=ss[0], sustained_ratio=sd[0] / ss[0],
                   dense_clock_mhz=sd[1], sparse_clock_mhz=ss[1], dense_power_w=sd[2], sparse_power_w=ss[2],
                   sustained_dense_tflops=flop / sd[0] / 1e9, sustained_sparse_tflops_dense_equiv=flop / ss[0] / 1e9)
        rows.append(row)
        print(f"{m:>6d} x {k:>5d} x {n:>5d} | {iso_d:7.3f}/{iso_s:7.3f} = {iso_d / iso_s:5.2f}x | "
              f"{sd[0]:7.3f}/{ss[0]:7.3f} = {sd[0] / ss[0]:5.2f}x | {sd[1]:6.0f}/{ss[1]:6.0f} | {sd[2]:5.0f}/{ss[2]:5.0f}",
              flush=True)
        del xs, ws, packed, dense, sparse
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from rtlynx.benchtools import run_metadata

    Path(args.out).write_text(json.dumps({**run_metadata(), "seconds": args.seconds,
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
