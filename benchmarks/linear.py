"""Linear-layer benchmark of the lynx Hopper kernels against cuBLAS dense and cuSPARSELt.

    python benchmarks/linear.py [--csv benchmarks/shapes_1024.csv] [--out benchmarks/results/h100_linear.json]
                                [--sweep] [--quick]

Columns per (M, K, N) of the target models' token-level linears (bf16, Y = X W^T + b):
- dense:        cuBLAS via F.linear(x, w, b)
- cslt_best:    cuSPARSELt GEMM only, X pre-pruned and pre-compressed, best algorithm from its search
                (its fused bias is per row for a sparse left operand, so no bias: GEMM only)
- cslt_online:  torch prune (reference) + _cslt_compress + _cslt_sparse_mm (what PyTorch offers today)
- *_graph:      dense, cslt_best, cslt_online, lynx_linear, lynx_lora captured in CUDA graphs (GPU time without host
                overhead; eager, torch rebuilds cuSPARSELt's descriptors and plan on every call)
- lynx_gemm:    rtlynx::sparse_gemm_sm90 on pre-compressed X, epilogue s * acc + b included
- lynx_linear:  rtlynx.ops.lynx_linear, prune + compress + norm + GEMM + bias
- lynx_lora:    the same + LoRA r = 64 (h = x A^T by cuBLAS, h B^T fused into the sparse GEMM as extra K)
- prune:        rtlynx::prune_compress_sm90 alone (TB/s = bytes of x read + values, meta, scale written)
Times: rtlynx.benchtools.measure medians after warm-up (a buffer larger than L2 is read between reps, so every
rep starts with cold L2); ratios are dense time / variant time from the same run.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rtlynx import ops  # noqa: E402
from rtlynx.benchtools import capture, fmt, geomean, median_ms, rotating, run_metadata  # noqa: E402
from rtlynx.reference import prune_nm  # noqa: E402

DEFAULT_CSV = ROOT / "benchmarks" / "shapes_1024.csv"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "h100_linear.json"


def bench(fn, reps=100, warmup=10):
    return median_ms(fn, reps=reps, warmup=warmup)


def bench_rotating(make_fn, nbytes_per_input, reps=60, warmup=5):
    """Median time of fn(i) over inputs rotated beyond L2, no flush between reps."""
    return median_ms(rotating(make_fn, nbytes_per_input), reps=reps, warmup=warmup)


graphed = capture  # fn captured in a CUDA graph: times the GPU work without host overhead


def cslt_search(compressed, dense_b):
    """Best cuSPARSELt algorithm id (API differs across torch versions)."""
    fns = []
    if hasattr(torch._C, "_cusparselt") and hasattr(torch._C._cusparselt, "mm_search"):
        fns.append(torch._C._cusparselt.mm_search)
    if hasattr(torch, "_cslt_sparse_mm_search"):
        fns.append(torch._cslt_sparse_mm_search)
    for f in fns:
        try:
            r = f(compressed, dense_b, None, None, None, False)
            if isinstance(r, (tuple, list)):
                return {"alg_id": int(r[0]), "split_k": int(r[1]) if len(r) > 1 else 1,
                        "split_k_mode": int(r[2]) if len(r) > 2 else -1}
            return {"alg_id": int(r), "split_k": 1, "split_k_mode": -1}
        except Exception as e:  # noqa: BLE001
            last = e
    raise RuntimeError(f"no cuSPARSELt search available: {last if fns else 'missing'}")


def is_large(m: int, k: int, n: int) -> bool:
    """M >= 4096 and N, K >= 3072: the layers that carry > 95 % of the FLOPs (12 shapes for FLUX / Qwen / Z-Image)."""
    return m >= 4096 and min(k, n) >= 3072


def load_shapes(path):
    rows = list(csv.DictReader(open(path)))
    for r in rows:
        for key in ("M", "K", "N", "count_per_forward"):
            r[key] = int(r[key])
        r["flop_share"] = float(r["flop_share"])
    return rows


def run_shape(m, k, n, sweep, quick, names):
    dt = torch.bfloat16
    torch.manual_seed(m * 7 + k * 3 + n)
    x = torch.randn(m, k, device="cuda", dtype=dt)
    w = torch.randn(n, k, device="cuda", dtype=dt) * k ** -0.5
    b = torch.randn(n, device="cuda", dtype=dt)
    a = torch.randn(64, k, device="cuda", dtype=dt) * k ** -0.5
    bb = torch.randn(n, 64, device="cuda", dtype=dt) * 0.1
    from rtlynx.ops import sm90 as k90

    rep = 40 if quick else 100
    res = {"M": m, "K": k, "N": n}
    res["dense_ms"] = bench(lambda: torch.nn.functional.linear(x, w, b), rep)
    # cuSPARSELt: needs M, K, N multiples of 16 (here all are)
    try:
        xp = prune_nm(x)
        comp = torch._cslt_compress(xp)
        wt = w.t()
        alg = cslt_search(comp, wt)
        res["cslt_alg"] = alg
        cslt_mm = lambda: torch._cslt_sparse_mm(comp, wt, alg_id=alg["alg_id"], split_k=alg["split_k"],  # noqa: E731
                                                split_k_mode=alg["split_k_mode"])
        res["cslt_best_ms"] = bench(cslt_mm, rep)
        res["cslt_online_ms"] = bench(lambda: torch._cslt_sparse_mm(torch._cslt_compress(prune_nm(x)), wt,
                                                                     alg_id=alg["alg_id"], split_k=alg["split_k"],
                                                                     split_k_mode=alg["split_k_mode"]), 20, 5)
    except Exception as e:  # noqa: BLE001
        res["cslt_error"] = f"{type(e).__name__}: {e}"[:300]
    values, meta, scale = ops.prune_compress(x)
    wext = k90.prepare_weight(w)
    from rtlynx.ops import _lib

    old = _lib.set_prune_impl(2)
    res["prune_v2_ms"] = bench(lambda: k90.prune_compress_sm90(x, None, True, 1e-8), rep)
    _lib.set_prune_impl(old)
    res["prune_ms"] = bench(lambda: k90.prune_compress_sm90(x, None, True, 1e-8), rep)
    kp = wext.shape[1]
    mp = (m + 63) // 64 * 64
    bytes_moved = m * k * 2 + m * kp // 2 * 2 + mp * kp // 8 + m * 4
    res["prune_tbps"] = bytes_moved / (res["prune_ms"] * 1e-3) / 1e12
    res["prune_v2_tbps"] = bytes_moved / (res["prune_v2_ms"] * 1e-3) / 1e12

    def make_prune():
        xi = torch.randn(m, k, device="cuda", dtype=dt)
        return lambda: k90.prune_compress_sm90(xi, None, True, 1e-8)

    res["prune_rotating_ms"] = bench_rotating(make_prune, m * k * 2)
    res["prune_rotating_tbps"] = bytes_moved / (res["prune_rotating_ms"] * 1e-3) / 1e12
    cfg_default, sched_default = k90.choose_config(m, n, kp)
    res["config_default"] = [names[cfg_default], sched_default]
    if sweep:
        res["config_ms"] = {}
        for c, name in enumerate(names):
            try:
                res["config_ms"][name] = bench(lambda: k90.sparse_gemm_sm90(values, meta, wext, scale, b, c, 0), rep)
            except Exception as e:  # noqa: BLE001
                res["config_ms"][name] = None
                res.setdefault("config_errors", {})[name] = str(e)[:200]
        ok = {kk: v for kk, v in res["config_ms"].items() if v is not None}
        best = min(ok, key=ok.get)
        res["config_best"] = [best, 0, ok[best]]
        if m * n >= 2048 * 2048:  # tile-scheduler options for the best config: swizzle x raster order
            c = names.index(best)
            res["sched_ms"] = {}
            for sw, ra in itertools.product((1, 2, 4, 8), (1, 2)):
                sched = sw | ra << 8
                res["sched_ms"][sched] = bench(lambda: k90.sparse_gemm_sm90(values, meta, wext, scale, b, c, sched),
                                               rep)
            sb = min(res["sched_ms"], key=res["sched_ms"].get)
            if res["sched_ms"][sb] < 0.98 * ok[best]:
                res["config_best"] = [best, sb, res["sched_ms"][sb]]
    res["lynx_gemm_ms"] = bench(lambda: k90.sparse_gemm_sm90(values, meta, wext, scale, b), rep)
    res["lynx_linear_ms"] = bench(lambda: ops.lynx_linear(x, w, b, True, None, None), rep)
    if sweep:  # A/B of programmatic dependent launch
        k90.PDL = False
        res["lynx_linear_nopdl_ms"] = bench(lambda: ops.lynx_linear(x, w, b, True, None, None), rep)
        k90.PDL = True
    ops.lynx_linear(x, w, b, True, a, bb)  # fill the weight cache
    res["lynx_lora_ms"] = bench(lambda: ops.lynx_linear(x, w, b, True, a, bb), rep)
    res["dense_lora_ms"] = bench(
        lambda: torch.addmm(b, x, w.t()).addmm_(torch.mm(x, a.t()), bb.t()), rep)  # dense + unfused LoRA
    # the same calls captured in CUDA graphs: GPU time without Python / dispatch overhead
    res["dense_graph_ms"] = bench(graphed(lambda: torch.nn.functional.linear(x, w, b)), rep)
    res["lynx_linear_graph_ms"] = bench(graphed(lambda: ops.lynx_linear(x, w, b, True, None, None)), rep)
    res["lynx_lora_graph_ms"] = bench(graphed(lambda: ops.lynx_linear(x, w, b, True, a, bb)), rep)
    if "cslt_best_ms" in res:  # eager, torch rebuilds cuSPARSELt's descriptors and plan every call (host time)
        try:
            res["cslt_best_graph_ms"] = bench(graphed(cslt_mm), rep)
            res["cslt_best_graph_speedup"] = res["dense_graph_ms"] / res["cslt_best_graph_ms"]
            res["cslt_online_graph_ms"] = bench(graphed(lambda: torch._cslt_sparse_mm(
                torch._cslt_compress(prune_nm(x)), wt, alg_id=alg["alg_id"], split_k=alg["split_k"],
                split_k_mode=alg["split_k_mode"])), 20, 5)
            res["cslt_online_graph_speedup"] = res["dense_graph_ms"] / res["cslt_online_graph_ms"]
        except Exception as e:  # noqa: BLE001
            res["cslt_graph_error"] = f"{type(e).__name__}: {e}"[:300]
    # L2-hot input, as inside a model: a producer kernel writes x right before the layer reads it (weights
    # stay cold). Time of [producer; layer] minus [producer] alone, both as CUDA graphs.
    x_src = torch.randn_like(x)
    prod = bench(graphed(lambda: x.copy_(x_src)), rep)
    res["dense_hot_ms"] = bench(graphed(lambda: (x.copy_(x_src), torch.nn.functional.linear(x, w, b))), rep) - prod
    res["lynx_linear_hot_ms"] = bench(graphed(lambda: (x.copy_(x_src), ops.lynx_linear(x, w, b, True, None, None))),
                                      rep) - prod
    res["lynx_linear_hot_speedup"] = res["dense_hot_ms"] / res["lynx_linear_hot_ms"]
    res["lynx_linear_graph_speedup"] = res["dense_graph_ms"] / res["lynx_linear_graph_ms"]
    res["lynx_lora_graph_speedup"] = res["dense_graph_ms"] / res["lynx_lora_graph_ms"]
    flops = 2 * m * n * k
    res["dense_tflops"] = flops / (res["dense_ms"] * 1e-3) / 1e12
    res["lynx_gemm_tflops_dense_equiv"] = flops / (res["lynx_gemm_ms"] * 1e-3) / 1e12
    for key in ("cslt_best", "cslt_online", "lynx_gemm", "lynx_linear", "lynx_lora"):
        if f"{key}_ms" in res:
            res[f"{key}_speedup"] = res["dense_ms"] / res[f"{key}_ms"]
    del x, x_src, w, b, a, bb, values, meta, scale, wext
    return res


def summarize(rows, per_shape):
    out = {}
    models = sorted({r["model"] for r in rows})
    keys = ("cslt_best", "cslt_best_graph", "lynx_gemm", "lynx_linear", "lynx_lora", "lynx_linear_graph",
            "lynx_lora_graph")
    for model in models + ["all"]:
        sel = [r for r in rows if model == "all" or r["model"] == model]
        shapes = {(r["M"], r["K"], r["N"]) for r in sel}
        s = {}
        for key in keys:
            vals = [per_shape[sh].get(f"{key}_speedup") for sh in shapes]
            s[f"{key}_speedup_geomean"] = geomean(vals)
            # FLOP-weighted mean over the model's layers, and the per-forward time ratio
            tot = sum(r["flop_share"] for r in sel)
            if tot > 0 and all(per_shape[(r["M"], r["K"], r["N"])].get(f"{key}_ms") for r in sel):
                s[f"{key}_speedup_flop_weighted"] = sum(
                    r["flop_share"] * per_shape[(r["M"], r["K"], r["N"])][f"{key}_speedup"] for r in sel) / tot
                base = "dense_graph_ms" if "graph" in key else "dense_ms"
                td = sum(r["count_per_forward"] * per_shape[(r["M"], r["K"], r["N"])][base] for r in sel)
                tv = sum(r["count_per_forward"] * per_shape[(r["M"], r["K"], r["N"])][f"{key}_ms"] for r in sel)
                s[f"{key}_forward_time_ratio"] = td / tv
        out[model] = s
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--sweep", action="store_true", help="time every compiled GEMM config per shape")
    p.add_argument("--quick", action="store_true", help="shorter timing (40 ms per measurement)")
    p.add_argument("--shapes", default="", help="only these M,K,N triples, e.g. 4608x3072x3072;512x3072x3072")
    args = p.parse_args(argv)

    ok, why = ops.lynx_status()
    if not ok:
        print(f"lynx kernels unavailable: {why}")
        return 1
    from rtlynx.ops import _lib

    names = _lib.config_names()
    rows = load_shapes(args.csv)
    uniq = sorted({(r["M"], r["K"], r["N"]) for r in rows}, key=lambda t: -t[0] * t[1] * t[2])
    if args.shapes:
        want = {tuple(int(v) for v in s.split("x")) for s in args.shapes.split(";") if s}
        uniq = [u for u in uniq if u in want]
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}  torch {torch.__version__}  configs: {', '.join(names)}", flush=True)
    per_shape = {}
    t0 = time.time()
    for m, k, n in uniq:
        r = run_shape(m, k, n, args.sweep, args.quick, names)
        per_shape[(m, k, n)] = r
        print(f"{m:>5} {k:>6} {n:>6}  dense {r['dense_ms']:.4f} ms ({r['dense_tflops']:.0f} TF/s)  "
              f"cslt {r.get('cslt_best_speedup', float('nan')):.2f}x "
              f"(graph {r.get('cslt_best_graph_speedup', float('nan')):.2f}x)  gemm {r['lynx_gemm_speedup']:.2f}x  "
              f"linear {r['lynx_linear_speedup']:.2f}x  lora {r['lynx_lora_speedup']:.2f}x  "
              f"(graphs {r['lynx_linear_graph_speedup']:.2f}x/{r['lynx_lora_graph_speedup']:.2f}x, "
              f"L2-hot x {r['lynx_linear_hot_speedup']:.2f}x)  "
              f"prune {r['prune_tbps']:.2f} TB/s (v2 {r['prune_v2_tbps']:.2f}, rotating {r['prune_rotating_tbps']:.2f})" + (f"  best cfg {r.get('config_best')}" if args.sweep else ""),
              flush=True)
    summ = summarize([r for r in rows if (r["M"], r["K"], r["N"]) in per_shape], per_shape)
    big = [r for r in per_shape.values() if r["M"] * r["K"] >= 4096 * 3072]
    summary = {
        "gemm_speedup_geomean": summ["all"]["lynx_gemm_speedup_geomean"],
        "linear_speedup_geomean": summ["all"]["lynx_linear_speedup_geomean"],
        "lora_linear_speedup_geomean": summ["all"]["lynx_lora_speedup_geomean"],
        "cslt_best_speedup_geomean": summ["all"]["cslt_best_speedup_geomean"],
        "cslt_best_graph_speedup_geomean": summ["all"]["cslt_best_graph_speedup_geomean"],
        "linear_graph_speedup_geomean": summ["all"]["lynx_linear_graph_speedup_geomean"],
        "lora_linear_graph_speedup_geomean": summ["all"]["lynx_lora_graph_speedup_geomean"],
        "large_shapes": {
            key: geomean([r.get(f"{key}_speedup") for r in per_shape.values() if is_large(r["M"], r["K"], r["N"])])
            for key in ("cslt_best", "cslt_best_graph", "lynx_gemm", "lynx_linear", "lynx_lora", "lynx_linear_graph",
                        "lynx_lora_graph", "lynx_linear_hot")},
        "linear_hot_speedup_geomean": geomean([r.get("lynx_linear_hot_speedup") for r in per_shape.values()]),
        "prune_compress_tbps": geomean([r["prune_tbps"] for r in big]),
        "prune_compress_tbps_rotating_inputs": geomean([r["prune_rotating_tbps"] for r in big]),
        "per_model": summ,
    }
    result = {**run_metadata(), "device": dev, "configs": names,
              "timing": "rtlynx.benchtools.measure: median of reps, L2 flushed by a read between reps",
              "rows": [per_shape[u] for u in uniq], "csv_rows": rows, "summary": summary,
              "seconds": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\n{dev}: speedup vs cuBLAS dense (geomean over {len(uniq)} shapes)")
    print(f"{'model':<16}{'cslt best':>10}{'lynx gemm':>11}{'linear':>9}{'+LoRA':>8}{'lin(graph)':>11}"
          f"{'LoRA(graph)':>12}   FLOP-weighted gemm/linear/lora")
    for model, s in summ.items():
        fw = [s.get(f"{k}_speedup_flop_weighted") for k in ("lynx_gemm", "lynx_linear", "lynx_lora")]
        print(f"{model:<16}{fmt(s['cslt_best_speedup_geomean']):>10}{fmt(s['lynx_gemm_speedup_geomean']):>11}"
              f"{fmt(s['lynx_linear_speedup_geomean']):>9}{fmt(s['lynx_lora_speedup_geomean']):>8}"
              f"{fmt(s['lynx_linear_graph_speedup_geomean']):>11}{fmt(s['lynx_lora_graph_speedup_geomean']):>12}   "
              + "/".join(fmt(v) for v in fw))
    print("large shapes (M >= 4096, N, K >= 3072): " + ", ".join(f"{k} {fmt(v)}" for k, v in summary["large_shapes"].items()))
    print(f"prune+compress: {fmt(summary['prune_compress_tbps'])} TB/s (geomean, M*K >= 4096*3072)")
    if args.sweep:
        table = {(r["M"], r["N"], (r["K"] + 127) // 128 * 128): tuple(r["config_best"][:2]) for r in per_shape.values()}
        print("suggested CONFIG_TABLE = {")
        for key, val in sorted(table.items()):
            print(f"    {key}: {val},")
        print("}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
