"""Producer fusion benchmark: the MLP down-projection y = GELU_tanh(h) W^T + b, dense vs sparse, with the GELU
either a separate pass or fused into the prune pass (rtlynx::gelu_prune_compress_sm90).

    python benchmarks/fusion.py [--csv benchmarks/shapes_1024.csv] [--out benchmarks/results/h100_fusion.json]

Shapes: the rows of the CSV whose K is an MLP hidden width (10240, 12288, 15360: the fc2 / w2 / proj_out inputs).
FLUX / Qwen-Image fc2 take GELU-tanh(h) exactly; Z-Image's w2 takes SiLU(w1 x) * w3 x (SwiGLU) and FLUX's single-block
proj_out takes [attention (3072) | GELU(mlp) (12288)], so for those rows the GELU over all of K is a stand-in with
the same bytes (an upper bound of the gain for proj_out, where only 80 % of K goes through the GELU).

Variants (bf16; times per call):
- (c) dense_mlp:      F.gelu(h) then cuBLAS F.linear(g, w, b)   [the baseline: dense also needs the GELU pass]
- (a) unfused:        F.gelu(h), rtlynx::prune_compress_sm90(g), rtlynx::sparse_gemm_sm90 (s * acc + b)
- (b) fused:          rtlynx::gelu_prune_compress_sm90(h), rtlynx::sparse_gemm_sm90
- (b') fused_dense:   the same with the dense GELU output written too (what a LoRA layer needs for x A^T)
and the parts alone: gelu, dense (cuBLAS only), prune, fused_prune, fused_prune_dense, gemm.
Timing: every variant is captured in a CUDA graph that calls it once on each of n input sets (h, w, b and the
intermediates per set; n such that the sets total >= 250 MB, far beyond the 50 MB L2), the graph is replayed after
warm-up and the median replay time / n is reported (GPU time without host overhead, inputs cold as in a real
model's layer sequence). Ratios are dense_mlp time / variant time from the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rtlynx.benchtools import fmt, geomean, measure, run_metadata  # noqa: E402
from rtlynx.ops import sm90 as k90  # noqa: E402

DEFAULT_CSV = ROOT / "benchmarks" / "shapes_1024.csv"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "h100_fusion.json"
MLP_K = (10240, 12288, 15360)


def gelu(h):
    return torch.nn.functional.gelu(h, approximate="tanh")


def graph_time(fns, reps=30, warmup=3):
    """(median, min, max) ms per call of fns[i](), each captured in a CUDA graph, replayed in turn (inputs rotated)."""
    t = measure(fns, reps=reps * len(fns), warmup=warmup * len(fns), graph=True, flush_l2=False)
    return t.median_ms, t.min_ms, t.max_ms


def run_shape(m, k, n, reps):
    dt = torch.bfloat16
    torch.manual_seed(m * 7 + k * 3 + n)
    set_bytes = 2 * (2 * m * k + n * k) + m * k  # h, g, w, values (+ meta)
    nsets = max(3, min(12, math.ceil(250e6 / set_bytes)))
    sets = []
    for _ in range(nsets):
        h = torch.randn(m, k, device="cuda", dtype=dt) * 2.0
        w = torch.randn(n, k, device="cuda", dtype=dt) * k ** -0.5
        b = torch.randn(n, device="cuda", dtype=dt)
        g = gelu(h)
        values, meta, scale = k90.prune_compress_sm90(g, None, True, 1e-8)
        sets.append(dict(h=h, w=w, wext=k90.prepare_weight(w), b=b, g=g, v=values, mt=meta, s=scale))
    # the fused kernel's operand is bit-identical to the unfused one (tests/gpu/test_sm90_fusion.py); check here too
    v2, mt2, s2, _ = k90.gelu_prune_compress_sm90(sets[0]["h"], True, 1e-8)
    same = torch.equal(v2.view(torch.int16), sets[0]["v"].view(torch.int16)) and torch.equal(mt2, sets[0]["mt"])

    def gemm(S, v, mt, s):
        return k90.sparse_gemm_sm90(v, mt, S["wext"], s, S["b"])

    def unfused(S):
        v, mt, s = k90.prune_compress_sm90(gelu(S["h"]), None, True, 1e-8)
        return gemm(S, v, mt, s)

    def fused(S, dense=False):
        v, mt, s, _ = k90.gelu_prune_compress_sm90(S["h"], True, 1e-8, dense)
        return gemm(S, v, mt, s)

    variants = {
        "gelu": lambda S: gelu(S["h"]),
        "dense": lambda S: torch.nn.functional.linear(S["g"], S["w"], S["b"]),
        "dense_mlp": lambda S: torch.nn.functional.linear(gelu(S["h"]), S["w"], S["b"]),
        "prune": lambda S: k90.prune_compress_sm90(S["g"], None, True, 1e-8),
        "fused_prune": lambda S: k90.gelu_prune_compress_sm90(S["h"], True, 1e-8, False),
        "fused_prune_dense": lambda S: k90.gelu_prune_compress_sm90(S["h"], True, 1e-8, True),
        "gemm": lambda S: gemm(S, S["v"], S["mt"], S["s"]),
        "unfused": unfused,
        "fused": fused,
        "fused_dense": lambda S: fused(S, True),
    }
    res = {"M": m, "K": k, "N": n, "input_sets": nsets, "fused_operand_bitwise_equal": same}
    for name, fn in variants.items():
        med, lo, hi = graph_time([lambda S=S, fn=fn: fn(S) for S in sets], reps)
        res[f"{name}_ms"], res[f"{name}_ms_min"], res[f"{name}_ms_max"] = med, lo, hi
    res["dense_mlp_repeat_ms"] = graph_time([lambda S=S: variants["dense_mlp"](S) for S in sets], reps)[0]
    kp = (k + 127) // 128 * 128
    mp = (m + 63) // 64 * 64
    comp = m * kp + mp * kp // 8 + 4 * m  # values (kp/2 x 2 B) + meta + scale
    res["bytes"] = {"gelu": 4 * m * k, "prune": 2 * m * k + comp, "fused_prune": 2 * m * k + comp,
                    "fused_prune_dense": 4 * m * k + comp}
    for key, nb in res["bytes"].items():
        res[f"{key}_tbps"] = nb / (res[f"{key}_ms"] * 1e-3) / 1e12
    for key in ("dense", "gemm", "unfused", "fused", "fused_dense"):
        res[f"{key}_speedup"] = res["dense_mlp_ms"] / res[f"{key}_ms"]
    res["gemm_vs_cublas"] = res["dense_ms"] / res["gemm_ms"]
    del sets
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    rows = [r for r in csv.DictReader(open(args.csv)) if int(r["K"]) in MLP_K]
    shapes = sorted({(int(r["M"]), int(r["K"]), int(r["N"])) for r in rows}, key=lambda t: -t[0] * t[1] * t[2])
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}  torch {torch.__version__}", flush=True)
    t0 = time.time()
    out = []
    for m, k, n in shapes:
        r = run_shape(m, k, n, args.reps)
        r["models"] = sorted({x["model"] for x in rows if (int(x["M"]), int(x["K"]), int(x["N"])) == (m, k, n)})
        out.append(r)
        print(f"{m:>5} {k:>6} {n:>5}  dense+gelu {r['dense_mlp_ms']:.4f} ms (again {r['dense_mlp_repeat_ms']:.4f})"
              f"  unfused {r['unfused_speedup']:.3f}x  fused {r['fused_speedup']:.3f}x  fused+dense-out "
              f"{r['fused_dense_speedup']:.3f}x | gelu {r['gelu_ms'] * 1e3:.1f} us ({r['gelu_tbps']:.2f} TB/s)  prune "
              f"{r['prune_ms'] * 1e3:.1f} us ({r['prune_tbps']:.2f})  fused prune {r['fused_prune_ms'] * 1e3:.1f} us "
              f"({r['fused_prune_tbps']:.2f}; +dense {r['fused_prune_dense_ms'] * 1e3:.1f} us)  gemm "
              f"{r['gemm_ms'] * 1e3:.1f} us ({r['gemm_vs_cublas']:.2f}x cuBLAS)  "
              f"bitwise {r['fused_operand_bitwise_equal']}", flush=True)
    summary = {key: geomean([r[f"{key}_speedup"] for r in out]) for key in ("unfused", "fused", "fused_dense", "gemm")}
    summary["fusion_gain"] = geomean([r["unfused_ms"] / r["fused_ms"] for r in out])
    result = {**run_metadata(), "device": dev, "timing": "rtlynx.benchtools.measure: one CUDA graph per call, "
              "replayed in turn over the input sets (>= 250 MB), median per call", "rows": out, "summary_speedup_geomean_vs_dense_mlp": summary,
              "seconds": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{dev}: MLP down-projection incl. its GELU, speed-up vs GELU + cuBLAS (geomean over {len(out)} shapes)")
    print("  " + "  ".join(f"{k} {fmt(v)}" for k, v in summary.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
