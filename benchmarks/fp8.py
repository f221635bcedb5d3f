"""FP8 + 2:4 benchmark (issue "FP8 + 2:4"): the linear layer on the 12 large shapes of shapes_1024.csv.

    python benchmarks/fp8.py linear [--out benchmarks/results/fp8_h200.json] [--sweep] [--quick]
    python benchmarks/fp8.py e2e [--out ...] [--reps 10]      FLUX.1-dev transformer forward, torch.compile

Columns per (M, K, N), bf16 in and out, Y = X W^T + b, all from the same run:
- bf16:             cuBLAS, F.linear
- fp8_dense_gemm:   torch._scaled_mm, e4m3 x (row-wise scales) and W (column-wise), fast accumulation, bias fused;
                    x quantised beforehand (GEMM only)
- fp8_dense:        the whole dense FP8 linear a user can run: per-token absmax quantisation of x (torch.compile'd,
                    one fused kernel) + the _scaled_mm above: what torchao's float8 dynamic-activation linears do
- lynx_bf16:        rtlynx bf16 2:4 linear (prune + compress + norm + sparse GEMM + bias)
- fp8_sparse_gemm:  rtlynx FP8 sparse GEMM on a pre-pruned, pre-quantised x (rs * sw * acc + b epilogue)
- fp8_sparse:       rtlynx FP8 RT-Lynx linear: prune + quantise + norm + FP8 sparse GEMM + bias
- fp8_prune:        the prune + quantise pass alone
Every variant runs as CUDA-graph replays (the same advantage for all), over input sets rotated beyond L2 (>= 150 MB),
median of --reps after warm-up. Ratios: time of the baseline / time of the variant, same run.
Results merge into --out under "linear"; the summary keys of the issue are recomputed on every write.

e2e: one FLUX.1-dev transformer forward (real configuration, random weights, 1024x1024 = 4096 image tokens, 512 text
tokens, bf16; benchmarks/e2e.py's model and inputs), every variant under torch.compile (default mode; --compile
regional compiles each transformer block once and reuses it, diffusers' compile_repeated_blocks: same kernels, minutes
less compile; --inductor: every variant with the inductor settings torchao's quantize_ imposes, or with inductor's
defaults), median of --reps after warm-up, same process:
- dense:               bf16
- fp8 recipe:          the flux-fast recipe: fused Q/K/V projections + torchao float8 dynamic-activation /
                       float8-weight linears (row-wise scales) on every nn.Linear (torchao 0.17.0, the release built
                       for torch 2.11)
- rtlynx fp8:          rtlynx.sparsify(dtype="fp8"): FP8 sparse sites on the preset's layers (FP8 weights only), the
                       rest bf16
- rtlynx fp8 + torchao: the same, and torchao's float8 linears on every layer rtlynx keeps dense (the recipe with
                       rtlynx's FP8 sparse sites in place of torchao's FP8 linears where they are sparse)
- rtlynx bf16, rtlynx bf16 centred, rtlynx fp8 centred: bf16 sites without and with token-mean centring
                       (centre="token_mean"), FP8 sites with it; not in the default list
- ... + LoRA r8:       the same with the rank-8 compensation LoRA the quality runs use (the rows above run without
                       it: norm compensation only); "rtlynx fp8 centred + LoRA r8" is the configuration of the FIDs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def large_shapes(path=ROOT / "benchmarks" / "shapes_1024.csv"):
    """The unique large (M, K, N) of benchmarks/linear.py (is_large), in file order."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from linear import is_large, load_shapes

    return list(dict.fromkeys((r["M"], r["K"], r["N"]) for r in load_shapes(path) if is_large(r["M"], r["K"], r["N"])))


def graph_time(make_fn, nbytes, reps=50, warmup=3):
    """Median time (ms) of one CUDA-graph replay of fn(inputs_i), input sets rotated beyond L2 (rtlynx.benchtools)."""
    from rtlynx.benchtools import measure, rotating

    fns = rotating(make_fn, max(nbytes, 1))
    return measure(fns, reps=reps, warmup=warmup * len(fns), graph=True, flush_l2=False).median_ms


@torch.compile(dynamic=True)
def _quant_rows(x):
    """Per-token absmax e4m3 quantisation (the dense FP8 baseline's activation pass)."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / 448.0
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def run_shape(m, k, n, sweep, reps):
    from rtlynx import ops
    from rtlynx.ops import fp8 as kf8
    from rtlynx.reference.fp8 import quantize_rows_e4m3

    dev = "cuda"
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device=dev, dtype=torch.bfloat16)
    wq_dense, sw_dense = quantize_rows_e4m3(w)  # [N, K] e4m3, [N]
    wq_t = wq_dense.t()  # column-major B for _scaled_mm
    sw_row = sw_dense.view(1, n)
    wq, sw = kf8.quantize_weight(w)
    xbytes = m * k * 2
    row = {"M": m, "K": k, "N": n}

    def new_x():
        return torch.randn(m, k, device=dev, dtype=torch.bfloat16)

    def t(name, make_fn, nbytes=xbytes):
        torch.cuda.synchronize()
        try:
            row[f"{name}_ms"] = graph_time(make_fn, nbytes, reps=reps)
        except Exception as e:  # noqa: BLE001 - record and go on: one failing column must not lose the row
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        print(f"  {name:18s} {row.get(f'{name}_ms', float('nan')):.4f} ms", flush=True)

    def mk_bf16():
        x = new_x()
        return lambda: torch.nn.functional.linear(x, w, b)

    def mk_fp8_dense_gemm():
        xq, sx = _quant_rows(new_x())
        return lambda: torch._scaled_mm(xq, wq_t, scale_a=sx, scale_b=sw_row, bias=b, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)

    def mk_fp8_dense():
        x = new_x()

        def f():
            xq, sx = _quant_rows(x)
            return torch._scaled_mm(xq, wq_t, scale_a=sx, scale_b=sw_row, bias=b, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)
        return f

    def mk_lynx_bf16():
        x = new_x()
        return lambda: ops.lynx_linear(x, w, b, True, None, None)

    def mk_fp8_gemm(config=-1):
        def make():
            v, meta, rs, _, _ = kf8.prune_quant_fp8_sm90(new_x(), True, 1e-8)
            return lambda: kf8.sparse_gemm_fp8_sm90(v, meta, wq, rs, sw, b, config, 0)
        return make

    def mk_fp8_sparse():
        x = new_x()
        return lambda: kf8.fp8_linear(x, wq, sw, b)

    def mk_fp8_prune():
        x = new_x()
        return lambda: kf8.prune_quant_fp8_sm90(x, True, 1e-8)

    t("bf16", mk_bf16)
    t("fp8_dense_gemm", mk_fp8_dense_gemm, m * k)
    t("fp8_dense", mk_fp8_dense)
    t("lynx_bf16", mk_lynx_bf16)
    if sweep:
        best = None
        for cid, name in enumerate(kf8.CONFIG_NAMES):
            if k % kf8.TILE_K[name]:
                continue
            t(f"cfg_{name}", mk_fp8_gemm(cid), m * k // 2)
            ms = row.get(f"cfg_{name}_ms")
            if ms is not None and (best is None or ms < best[1]):
                best = (name, ms)
        if best is not None:
            row["fp8_best_config"] = best[0]
            kf8.CONFIG_TABLE[(m, n, k)] = (best[0], 0)
            kf8._config.cache_clear()
    t("fp8_sparse_gemm", mk_fp8_gemm(), m * k // 2)
    t("fp8_sparse", mk_fp8_sparse)
    t("fp8_prune", mk_fp8_prune)
    for base in ("bf16", "fp8_dense", "fp8_dense_gemm"):
        for v in ("fp8_dense", "fp8_dense_gemm", "lynx_bf16", "fp8_sparse_gemm", "fp8_sparse"):
            if v != base and row.get(f"{base}_ms") and row.get(f"{v}_ms"):
                row[f"{v}_vs_{base}"] = row[f"{base}_ms"] / row[f"{v}_ms"]
    if row.get("fp8_prune_ms"):  # bytes read (x) + written (values, meta, 3 scales)
        row["fp8_prune_TBps"] = (m * k * 2 + m * k // 2 + m * k // 8 + 12 * m) / row["fp8_prune_ms"] / 1e9
    return row


def identity() -> dict:
    from rtlynx.benchtools import run_metadata

    meta = run_metadata()
    return {**meta, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def load(out: Path) -> dict:
    return json.loads(out.read_text()) if out.exists() else {}


def save(out: Path, data: dict) -> None:
    from rtlynx.benchtools import geomean

    lin = data.get("linear", {}).get("rows", [])
    summ = data.setdefault("summary", {})
    if lin:
        summ["linear_vs_bf16_large"] = geomean([r.get("fp8_sparse_vs_bf16") for r in lin])
        summ["linear_vs_fp8_dense_large"] = geomean([r.get("fp8_sparse_vs_fp8_dense") for r in lin])
        summ["linear_vs_fp8_dense_gemm_large"] = geomean([r.get("fp8_sparse_vs_fp8_dense_gemm") for r in lin])
        summ["gemm_vs_fp8_dense_gemm_large"] = geomean([r.get("fp8_sparse_gemm_vs_fp8_dense_gemm") for r in lin])
        summ["fp8_dense_vs_bf16_large"] = geomean([r.get("fp8_dense_vs_bf16") for r in lin])
        summ["lynx_bf16_vs_bf16_large"] = geomean([r.get("lynx_bf16_vs_bf16") for r in lin])
    e2e = {r["variant"]: r for run in data.get("e2e_runs", []) for r in run["rows"] if "ms" in r}  # latest wins
    for key, variant in (("e2e_flux_compiled_vs_bf16", "vs_dense"), ("e2e_flux_compiled_vs_fp8_recipe", "vs_fp8_recipe")):
        best = max((r.get(variant) or 0 for n, r in e2e.items() if n.startswith("rtlynx fp8")), default=0)
        if best:
            summ[key] = best
    if "fp8 recipe" in e2e:
        summ["e2e_fp8_recipe_vs_bf16"] = e2e["fp8 recipe"].get("vs_dense")
    # quality (issue item 6): benchmarks/quality.py's FID runs next to this file (every step sparse; shipped schedule)
    for key, name in (("fid_fp8_over_bf16_rtlynx", "quality_fp8.json"),
                      ("fid_fp8_over_bf16_rtlynx_dense_below_t0.2", "quality_fp8_t0.2.json")):
        q = out.parent / name
        fid = json.loads(q.read_text()).get("summary", {}).get("fid_fp8_over_bf16_rtlynx") if q.exists() else None
        if fid is not None:
            summ[key] = fid
    pending = data.get("summary_pending", {})
    for key in [k for k in pending if k in summ]:
        del pending[key]
    if not pending:
        data.pop("summary_pending", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out)


def cmd_linear(args) -> int:
    out = Path(args.out)
    data = load(out)
    data["device"] = torch.cuda.get_device_name()
    shapes = large_shapes()[: 3 if args.quick else None]
    rows = []
    data["linear"] = {"identity": identity(), "rows": rows, "reps": args.reps, "sweep": args.sweep}
    print(f"{data['device']}: {len(shapes)} shapes", flush=True)
    for m, k, n in shapes:
        print(f"M={m} K={k} N={n}", flush=True)
        rows.append(run_shape(m, k, n, args.sweep, args.reps))
        save(out, data)
    hdr = f"{'M':>5} {'K':>6} {'N':>6} | {'bf16':>7} {'fp8dense':>8} {'lynx16':>7} {'fp8sp':>7} | " \
          f"{'fp8sp/bf16':>10} {'fp8sp/fp8d':>10} {'gemm/gemm':>9}"
    print(hdr)
    for r in rows:
        def f(key, w=7):
            v = r.get(key)
            return f"{v:{w}.3f}" if v else " " * (w - 1) + "-"
        print(f"{r['M']:5d} {r['K']:6d} {r['N']:6d} | {f('bf16_ms')} {f('fp8_dense_ms', 8)} {f('lynx_bf16_ms')} "
              f"{f('fp8_sparse_ms')} | {f('fp8_sparse_vs_bf16', 10)} {f('fp8_sparse_vs_fp8_dense', 10)} "
              f"{f('fp8_sparse_gemm_vs_fp8_dense_gemm', 9)}")
    print(json.dumps(data["summary"], indent=1))
    return 0


E2E_VARIANTS = ("dense", "rtlynx fp8", "rtlynx fp8 + torchao", "fp8 recipe", "rtlynx bf16", "rtlynx bf16 centred",
                "rtlynx fp8 centred", "rtlynx bf16 + LoRA r8", "rtlynx fp8 + LoRA r8", "rtlynx bf16 centred + LoRA r8",
                "rtlynx fp8 centred + LoRA r8", "rtlynx bf16 centred + LoRA fill", "rtlynx fp8 centred + LoRA fill")
E2E_DEFAULT = E2E_VARIANTS[:4]
# "+ LoRA r8": the compensation LoRA of the quality runs (rank 8, in the GEMM tail), which the other rtlynx rows leave
# out (lora_rank=0, norm compensation only); "centred + LoRA r8" is the configuration the FID of issue 18 measures;
# "+ LoRA fill": each site at 64 // members (rtlynx.sites.operand.fill_rank), the tail width of rank 8 on bf16 sites
# rtlynx bf16 centred: token-mean centring (SparsityConfig.centre): the token mean per site input, subtracted inside
# the prune kernel where the library has the centring prunes: its row against "rtlynx bf16" is what centring costs


def _torchao_fp8(model, only_plain_linear: bool):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    # rtlynx's SparseActLinear is not an nn.Linear; exact nn.Linear only, so nothing rtlynx runs is touched
    quantize_(model, cfg, filter_fn=(lambda m, fqn: type(m) is torch.nn.Linear) if only_plain_linear else None)


def cmd_e2e(args) -> int:
    import gc
    import warnings

    import rtlynx
    from rtlynx.integrations.diffusers import example_inputs

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import e2e as E  # the model builder, inputs and timing loop of the bf16 end-to-end table

    out = Path(args.out)
    data = load(out)
    data["device"] = torch.cuda.get_device_name()
    rows = []
    # every call is one run (its own dense row: ratios never mix runs); earlier runs are kept
    import faulthandler

    # a compile that stalls prints where it is (every 120 s) instead of dying silent at the call's time limit
    faulthandler.dump_traceback_later(120, repeat=True, file=sys.stderr)
    data.setdefault("e2e_runs", []).append({"identity": identity(), "model": "flux", "mode": "compiled",
                                            "compile": args.compile, "compile_mode": args.mode,
                                            "reps": args.reps, "resolution": "1024x1024 (4096 image tokens)",
                                            "text_len": 512, "rows": rows})
    model = None

    def fresh():
        nonlocal model
        model = None
        gc.collect()
        torch.cuda.empty_cache()
        model = E.build("flux")
        return model

    # torchao's quantize_ switches inductor to coordinate-descent tuning for the rest of the process (its
    # recommended_inductor_config_setter); every variant gets the same inductor settings: the recipe's ("recipe",
    # set here before the first compile) or inductor's defaults ("default", put back after every quantize_)
    knobs = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul",
             "fx_graph_cache")
    from torch._inductor import config as inductor_config

    if args.inductor == "recipe":
        from torchao.quantization.utils import recommended_inductor_config_setter

        recommended_inductor_config_setter()
    inductor = {k: getattr(inductor_config, k) for k in knobs}
    data["e2e_runs"][-1]["inductor"] = {"settings": args.inductor, **inductor}
    fresh()
    inputs = example_inputs(model, batch=1, text_len=512, **E.MODELS["flux"][2])
    inputs["guidance"] = torch.full((1,), 3.5, device="cuda")
    dense_ms = None
    for name in args.variants:
        t0 = time.time()
        try:
            if name == "fp8 recipe":
                fresh()
                model.fuse_qkv_projections()
                _torchao_fp8(model, only_plain_linear=False)
            elif name.startswith("rtlynx"):
                rtlynx.sparsify(model, dtype="fp8" if name.startswith("rtlynx fp8") else "native",
                                centre="token_mean" if "centred" in name else None,
                                lora_rank=8 if name.endswith(("+ LoRA r8", "+ LoRA fill")) else 0)
                if name.endswith("+ LoRA fill"):
                    from rtlynx.distill_global import grow_lora_rank

                    grow_lora_rank(model, "fill")
                if name.endswith("torchao"):
                    _torchao_fp8(model, only_plain_linear=True)
            for k, v in inductor.items():
                setattr(inductor_config, k, v)
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            torch._dynamo.reset()
            t_prep = time.time() - t0
            if args.compile == "regional":
                model.compile_repeated_blocks(mode=args.mode)
                runner = model
            else:
                runner = torch.compile(model, mode=args.mode)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ms = E.time_forward(runner, inputs, args.reps)
            peak = torch.cuda.max_memory_allocated() / 2**30
            dense_ms = dense_ms or ms
            row = {"variant": name, "ms": ms, "vs_dense": dense_ms / ms, "peak_gib": peak,
                   "prepare_s": round(t_prep, 1), "compile_and_time_s": round(time.time() - t0, 1),
                   "warnings": sorted({str(w.message)[:160] for w in caught})}
            if args.profile:  # after the timing: one profiled forward, GPU time per kernel class
                try:
                    row["split"] = E.time_split(runner, inputs)
                except Exception as e:  # noqa: BLE001 - a profiler problem must not lose the timing
                    row["split"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        except Exception as e:  # noqa: BLE001 - keep the rows already measured
            row = {"variant": name, "error": f"{type(e).__name__}: {e}"[:400]}
        rows.append(row)
        recipe = next((r for r in rows if r["variant"] == "fp8 recipe" and "ms" in r), None)
        for r in rows:
            if recipe and "ms" in r:
                r["vs_fp8_recipe"] = recipe["ms"] / r["ms"]
        print(json.dumps(row), flush=True)
        save(out, data)
        runner = None  # the compiled wrapper holds the model: the next variant's peak must not include it
        torch._dynamo.reset()
        if name.endswith("torchao") or args.compile == "regional":  # changed in place: the next one needs a new model
            fresh()
        elif name.startswith("rtlynx"):
            rtlynx.unsparsify(model)
    print(json.dumps(data["summary"], indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("linear", help="the linear-layer table", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--out", default=str(RESULTS / "fp8_h200.json"), help="results JSON (merged)")
    q.add_argument("--sweep", action="store_true", help="time every FP8 GEMM config per shape and use the best")
    q.add_argument("--quick", action="store_true", help="first 3 shapes only")
    q.add_argument("--reps", type=int, default=50, help="timed replays per variant")
    q = sub.add_parser("e2e", help="FLUX.1-dev compiled forward: bf16, FP8 recipe, rtlynx FP8", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--out", default=str(RESULTS / "fp8_h200.json"), help="results JSON (merged)")
    q.add_argument("--reps", type=int, default=10, help="timed forwards per variant")
    q.add_argument("--variants", nargs="+", default=list(E2E_DEFAULT), choices=E2E_VARIANTS,
                   help="in this order (dense first: the ratios need it)")
    q.add_argument("--inductor", choices=("recipe", "default"), default="recipe",
                   help="inductor settings for every variant: the ones torchao's quantize_ sets (coordinate-descent "
                        "tuning...), or inductor's defaults")
    q.add_argument("--profile", action="store_true", help="after timing, one profiled forward per variant "
                   "(GPU ms per kernel class, top kernels: benchmarks/e2e.py time_split)")
    q.add_argument("--mode", choices=("default", "reduce-overhead"), default="default",
                   help="torch.compile mode for every variant (reduce-overhead: CUDA graphs, no host time per launch)")
    q.add_argument("--compile", choices=("full", "regional"), default="full",
                   help="torch.compile the whole transformer, or each repeated block (the same for every variant)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8.py: needs a CUDA GPU (sm_90)", file=sys.stderr)
        return 2
    return {"linear": cmd_linear, "e2e": cmd_e2e}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
