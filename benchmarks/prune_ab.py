"""The prune passes, this build against another build of csrc/prune_compress_sm90.cu, in the same run.

    python benchmarks/prune_ab.py [--old-lib OLD.so] [--out benchmarks/results/prune_ab_h200.json]
    ncu ... python benchmarks/prune_ab.py --once      one launch of each kernel and shape (for Nsight Compute)

OLD.so: the prune unit of another commit compiled alone (nvcc -shared; it has the same C entry points). Per (M, K)
of the large linear shapes: the FP8 prune + quantise (plain and GELU producer) and the bf16 prune + compress, each
as CUDA-graph replays over input sets rotated beyond L2 (rtlynx.benchtools), median of --reps; effective bandwidth
= bytes read + written / time (HBM3e of the H200: 4.8 TB/s). With OLD.so the outputs of both builds are compared
bit for bit on the first input (values, metadata, scales) before timing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SHAPES_MK = [(4608, 3072), (4608, 15360), (4096, 3072), (4096, 12288), (4224, 3840), (4224, 10240)]
GELU_MK = [(4096, 12288), (4608, 3072)]


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


class Build:
    """The prune entry points of one library: this package's (ops) or a standalone .so (ctypes)."""

    def __init__(self, so: str | None):
        self.lib = None
        if so:
            self.lib = ctypes.CDLL(so, mode=ctypes.RTLD_LOCAL)
            f = self.lib.rtlynx_prune_quant_fp8_sm90
            f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int,
                          ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p]
            g = self.lib.rtlynx_prune_compress_sm90
            g.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                          ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p]

    def fp8(self, x, act, out):
        if self.lib is None:
            from rtlynx.ops import fp8 as kf8

            return kf8.prune_quant_fp8_sm90(x, True, 1e-8, act)
        v, meta, rs, sx, s = out
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        rc = self.lib.rtlynx_prune_quant_fp8_sm90(0, act, _ptr(x), x.stride(0), x.shape[0], x.shape[1], _ptr(v),
                                                  v.stride(0), _ptr(meta), _ptr(rs), _ptr(sx), _ptr(s), 1, 1e-8,
                                                  stream)
        if rc:
            raise RuntimeError(f"old prune_quant_fp8: error {rc}")
        return out

    def bf16(self, x, out):
        if self.lib is None:
            from rtlynx.ops import sm90 as k90

            return k90.prune_compress_sm90(x, None, True, 1e-8)
        v, meta, scale = out
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        rc = self.lib.rtlynx_prune_compress_sm90(0, _ptr(x), x.stride(0), x.shape[0], x.shape[1], None, 0, 0, _ptr(v),
                                                 v.stride(0), _ptr(meta), _ptr(scale), 1, 1e-8, stream)
        if rc:
            raise RuntimeError(f"old prune_compress: error {rc}")
        return out


def _outputs(x, kind):
    """Output buffers shaped as the ops allocate them (for the ctypes build)."""
    from rtlynx.reference.sm90 import padded_shape

    m, k = x.shape
    mp, kp = padded_shape(m, k)
    if kind == "fp8":
        return (torch.empty(m, kp // 2, dtype=torch.uint8, device="cuda"),
                torch.zeros(mp * kp // 8, dtype=torch.uint8, device="cuda"),
                *(torch.empty(m, device="cuda") for _ in range(3)))
    return (torch.empty(m, kp // 2, dtype=x.dtype, device="cuda"),
            torch.zeros(mp * kp // 8, dtype=torch.uint8, device="cuda"), torch.empty(m, device="cuda"))


def _bytes(m, k, kind):
    return m * k * 2 + (m * k // 2 if kind == "fp8" else m * k) + m * k // 8 + 12 * m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-lib", default=None)
    ap.add_argument("--once", action="store_true", help="one launch per kernel and shape, no timing (ncu)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_ab_h200.json"))
    args = ap.parse_args(argv)
    from rtlynx.benchtools import measure, rotating, run_metadata

    builds = {"new": Build(None)}
    if args.old_lib:
        builds["old"] = Build(args.old_lib)
    gen = torch.Generator(device="cuda")
    seed = 1234
    gen.manual_seed(seed)
    print(f"seed {seed}", flush=True)
    cases = [("fp8", m, k, 0) for m, k in SHAPES_MK] + [("fp8", m, k, 1) for m, k in GELU_MK] + \
            [("bf16", m, k, 0) for m, k in SHAPES_MK[:2]]
    rows = []
    for kind, m, k, act in cases:
        row = {"kind": kind, "gelu": bool(act), "M": m, "K": k}

        def make(build, kind=kind, m=m, k=k, act=act):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            out = _outputs(x, kind)
            if kind == "fp8":
                return lambda: build.fp8(x, act, out)
            return lambda: build.bf16(x, out)

        if args.once:
            for b in builds.values():
                make(b)()
            torch.cuda.synchronize()
            continue
        if "old" in builds:  # same input, both builds: bit for bit
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            got = {}
            for name, b in builds.items():
                out = _outputs(x, kind)
                res = b.fp8(x, act, out) if kind == "fp8" else b.bf16(x, out)
                got[name] = [t if t.dtype == torch.float32 else t.view(torch.uint8) for t in res[:4 if kind == "fp8" else 3]]
            same = all(torch.equal(a, b) for a, b in zip(got["new"], got["old"]))
            row["bitwise_equal_old_new"] = bool(same)
        for name, b in builds.items():
            ms = measure(rotating(lambda b=b: make(b), m * k * 2), reps=args.reps, warmup=3, graph=True,
                         flush_l2=False).median_ms
            row[f"{name}_us"] = round(ms * 1e3, 2)
            row[f"{name}_TBps"] = round(_bytes(m, k, kind) / ms / 1e9, 3)
        if "old_us" in row:
            row["speedup"] = round(row["old_us"] / row["new_us"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.once:
        return 0
    result = {**run_metadata(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "old_lib": args.old_lib,
              "seed": seed, "reps": args.reps, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
