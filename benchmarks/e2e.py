"""End-to-end transformer forward at the real model sizes (GPU): dense vs RT-Lynx on the lynx kernels.

No checkpoint can be downloaded here, so each model is the diffusers class with its real configuration
(FLUX.1-dev, Qwen-Image, Z-Image: the class defaults) and random weights; time does not depend on the weight
values. One forward = one sampling step at 1024x1024 (4096 image tokens) with a 512-token prompt, batch 1, bf16.
Each row is the median of --reps forwards (CUDA events, after warm-up); ratios are against the dense forward of
the same model in the same mode (eager / compiled) in the same process. Per row: peak memory, and with
--profile the time split of one forward by kernel class (sparse GEMMs, prune / producer passes, dense GEMMs,
attention, the rest). --check compares every site of the first blocks, on the inputs it really sees, with the
per-layer reference (rtlynx.reference, fp32).

Rows are merged into --out (one file per device), so models and modes can run in separate processes / calls:

    python benchmarks/e2e.py --models flux --profile --check          # eager
    python benchmarks/e2e.py --models flux --compile                  # torch.compile (default mode)
    python benchmarks/e2e.py --models qwen-image --compile --regional # each repeated block (compiled-regional)
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import warnings
from pathlib import Path

import torch

import rtlynx
from rtlynx._compile import mark_step, uncompile
from rtlynx.benchtools import kernel_library, measure, run_metadata
from rtlynx.integrations.diffusers import example_inputs

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # kind -> (class, config overrides on the class defaults, example_inputs size for 1024x1024)
    "flux": ("FluxTransformer2DModel", dict(guidance_embeds=True), dict(height=64, width=64)),
    "qwen-image": ("QwenImageTransformer2DModel", {}, dict(height=128, width=128)),
    "z-image": ("ZImageTransformer2DModel", {}, dict(height=128, width=128)),
}
VARIANTS = {  # name -> sparsify kwargs (None: dense)
    "dense": None,
    "rtlynx": dict(),                                   # default preset, norm compensation, activation sites
    "rtlynx + LoRA r64": dict(lora_rank=64),
    "rtlynx per-layer (v0.1)": dict(fuse_sites=False),  # the same layers, one prune + GEMM per layer
    "rtlynx per-layer + LoRA r64 (v0.1)": dict(fuse_sites=False, lora_rank=64),
}
SUMMARY_KEY = {"flux": "flux", "qwen-image": "qwen_image", "z-image": "z_image"}


def build(kind: str, device: str = "cuda", tiny: bool = False):
    from rtlynx.integrations.diffusers import TINY_CONFIGS

    cls_name, cfg, _ = MODELS[kind]
    return build_model(cls_name, TINY_CONFIGS[kind][1] if tiny else cfg, device)


def build_model(cls_name: str, cfg: dict, device: str = "cuda"):
    """The diffusers class ``cls_name`` with config ``cfg`` and random weights, in eval mode."""
    import diffusers

    # Built directly on the device in bf16 (a 20B-parameter model does not fit in fp32); the modules'
    # own initialisers give sane random weights and the RoPE tables their real values.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = getattr(diffusers, cls_name)(**cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.eval()
    if device == "cpu":
        model = model.float()
    return model


def device_and_results(out: str | None, default) -> tuple[str, Path, dict]:
    """(this device's name, the results file: ``out`` or ``default(device name)``, its document so far); a file
    holding rows of another device is refused (rows merge, one file per device)."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    path = Path(out or default(dev))
    doc = json.loads(path.read_text()) if path.exists() else {}
    if doc.get("device") not in (None, dev):
        raise SystemExit(f"{path} holds rows of {doc['device']}, this is {dev}: pass another --out")
    return dev, path, doc


def time_forward(model, inputs, reps: int) -> float:
    """Median ms of one forward (rtlynx.benchtools.measure; synchronised after each, so host time counts). Each
    forward begins a CUDA-graph step (under mode="reduce-overhead", regional compile included, the blocks of one
    forward must not overwrite each other's outputs: rtlynx.cudagraphs); elsewhere the mark does nothing."""
    def forward():
        mark_step()
        return model(**inputs)

    with torch.no_grad():
        return measure(forward, reps=reps, warmup=3, flush_l2=False, sync_each=True).median_ms


def kernel_class(name: str) -> str:
    n = name.lower()
    if "prune_compress" in n or "prune_quant" in n:
        return "prune / producer passes"
    if "sparse" in n and ("cutlass" in n or "gemm" in n):
        return "sparse GEMMs"
    if any(s in n for s in ("flash", "sdpa", "fmha", "attention")):
        return "attention"
    if any(s in n for s in ("nvjet", "gemm", "xmma", "cublas", "cutlass", "splitk")):
        return "dense GEMMs"
    if n.startswith("triton"):  # inductor's fused elementwise / reduction kernels (torchao's FP8 casts among them)
        return "triton (inductor)"
    return "rest"


CLASSES = ("sparse GEMMs", "prune / producer passes", "dense GEMMs", "attention", "triton (inductor)", "rest")


def time_split(model, inputs) -> dict:
    """One profiled forward: wall ms, GPU ms per kernel class, kernel count, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            wall = 1e3 * (time.perf_counter() - t)
    split = dict.fromkeys(CLASSES, 0.0)
    rows, launches = [], 0
    for e in prof.key_averages():
        if e.self_device_time_total <= 0 or e.device_type.name != "CUDA":
            continue
        ms = e.self_device_time_total / 1e3
        split[kernel_class(e.key)] += ms
        launches += e.count
        rows.append(dict(kernel=e.key[:110], calls=e.count, ms=round(ms, 3)))
    rows.sort(key=lambda r: -r["ms"])
    return dict(wall_ms=wall, gpu_ms=sum(split.values()), kernels=launches,
                split_ms={k: round(v, 3) for k, v in split.items()}, top=rows[:10])


def check_sites(model, inputs, blocks: int = 2) -> dict:
    """Every site of the first ``blocks`` blocks of each block list, on the inputs it really sees, vs the per-layer
    reference spec (rtlynx.sites.verify): max relative error."""
    from rtlynx import sites

    lists = [n for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList)]
    errs = sites.verify(model, prefixes=tuple(f"{n}.{i}." for n in lists for i in range(blocks)), **inputs)
    return dict(sites=len(errs), max_rel_err=max(errs.values()) if errs else None, rel_err=errs)


def summarize(rows: list[dict]) -> dict:
    """{"flux": {"eager": x, "compiled": x, "eager_lora": x, "peak_mem_ratio_lora": x}, ...} from the rows."""
    out = {}
    for kind, key in SUMMARY_KEY.items():
        r = {(x["variant"], x["mode"]): x for x in rows if x["model"] == kind}
        if not r:
            continue

        def ratio(variant, mode, field="speedup"):
            row = r.get((variant, mode))
            return None if row is None else row.get(field)

        dense = r.get(("dense", "eager"))
        lora = r.get(("rtlynx + LoRA r64", "eager"))
        out[key] = {"eager": ratio("rtlynx", "eager"), "compiled": ratio("rtlynx", "compiled"),
                    "compiled_regional": ratio("rtlynx", "compiled-regional"),
                    "eager_lora": ratio("rtlynx + LoRA r64", "eager"),
                    "peak_mem_ratio_lora": (lora["peak_gib"] / dense["peak_gib"]) if lora and dense and dense["peak_gib"] else None,
                    "eager_v01": ratio("rtlynx per-layer (v0.1)", "eager"),
                    "compiled_lora": ratio("rtlynx + LoRA r64", "compiled")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--backend", default="lynx")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each variant (default mode; fuses diffusers' elementwise work)")
    ap.add_argument("--regional", action="store_true",
                    help="with --compile: diffusers' compile_repeated_blocks, each repeated block compiled once (minutes "
                         "less compiling: Qwen-Image's whole-model compile outran a device call); rows of their own "
                         "mode, compiled-regional")
    ap.add_argument("--profile", action="store_true", help="time split of one forward per variant (eager)")
    ap.add_argument("--check", action="store_true", help="sites of the first blocks vs the per-layer reference")
    ap.add_argument("--variants", nargs="+", default=["dense", "rtlynx", "rtlynx + LoRA r64"], choices=list(VARIANTS))
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU, reference backend (checks the script)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.backend, args.text_len = "reference", 8
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/e2e.py needs a CUDA GPU (--smoke checks the script on a CPU)")
    gpu, out, doc = device_and_results(args.out, lambda name: RESULTS / f"e2e_{name.replace(' ', '_')}.json")
    rows = doc.get("rows", [])
    if args.regional and not args.compile:
        raise SystemExit("--regional is a kind of --compile: pass both")
    mode = ("compiled-regional" if args.regional else "compiled") if args.compile else "eager"
    if "dense" not in args.variants:
        args.variants = ["dense", *args.variants]  # ratios need the dense row of the same run

    def save():
        doc.update({**run_metadata(), "device": gpu, "backend": args.backend,
                    "kernel_library": kernel_library() or doc.get("kernel_library"),
                    "resolution": "1024x1024 (4096 image tokens)",
                    "text_len": args.text_len, "batch": 1, "dtype": "bfloat16", "rows": rows,
                    "summary": summarize(rows)})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))

    print(f"{gpu}, {mode}, median of {args.reps} forwards")
    print(f"{'model':11s} {'variant':36s} {'ms':>8s} {'vs dense':>8s} {'peak GiB':>8s}")
    for kind in args.models:
        t0 = time.time()
        model = build(kind, "cpu" if args.smoke else "cuda", tiny=args.smoke)
        size = dict(height=8, width=8) if args.smoke else MODELS[kind][2]
        inputs = example_inputs(model, batch=1, text_len=args.text_len, **size)
        if getattr(model.config, "guidance_embeds", False) and kind == "flux":  # FLUX.1-dev is guidance-distilled
            inputs["guidance"] = torch.full((1,), 3.5, device=inputs["timestep"].device)
        params = sum(p.numel() for p in model.parameters())
        dense_ms = None
        for vname in args.variants:
            kw = VARIANTS[vname]
            if kw is not None:
                rtlynx.sparsify(model, backend=args.backend, **kw)
            gc.collect()  # the garbage of the last (un)sparsify must not be collected inside the timed loop
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            runner = model
            if args.compile:
                torch._dynamo.reset()
                if args.regional:  # in place, block by block; uncompile() below undoes it
                    model.compile_repeated_blocks(**({"backend": "eager"} if args.smoke else {}))
                else:
                    runner = torch.compile(model, **({"backend": "eager"} if args.smoke else {}))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tc = time.time()
                ms = time_forward(runner, inputs, args.reps)
                extra = {}
                if args.compile:
                    from torch._dynamo.utils import counters
                    extra["graph_breaks"] = sum(counters["graph_break"].values())
                    extra["compile_and_time_s"] = round(time.time() - tc, 1)
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            if args.profile and torch.cuda.is_available() and not args.compile:
                try:
                    extra["profile"] = time_split(model, inputs)
                except Exception as e:  # a profiler problem must not lose the timings
                    print(f"  profile failed: {e!r}")
            if args.check and kw is not None and torch.cuda.is_available():
                extra["check"] = check_sites(model, inputs)
            fallbacks = sorted({str(w.message)[:160] for w in caught})
            dense_ms = dense_ms or ms
            share = rtlynx.summary(model).sparse_flop_share if kw is not None else None
            rows[:] = [r for r in rows if (r["model"], r["variant"], r["mode"]) != (kind, vname, mode)]
            rows.append(dict(model=kind, variant=vname, mode=mode, params=params, ms=ms, speedup=dense_ms / ms,
                             peak_gib=peak, sparse_weight_share=share, fallback_warnings=fallbacks, **extra))
            print(f"{kind:11s} {vname:36s} {ms:8.2f} {dense_ms / ms:7.3f}x "
                  f"{'' if peak is None else f'{peak:8.2f}'}" + (f"  warnings: {fallbacks}" if fallbacks else ""),
                  flush=True)
            if "profile" in extra:
                p = extra["profile"]
                print("    split (GPU ms): " + ", ".join(f"{k} {v:.1f}" for k, v in p["split_ms"].items())
                      + f"; {p['kernels']} kernels, wall {p['wall_ms']:.1f} ms", flush=True)
            if "check" in extra:
                print(f"    check: {extra['check']['sites']} sites, max rel err {extra['check']['max_rel_err']:.2e}")
            if args.compile:
                print(f"    compile + timing {extra['compile_and_time_s']} s, {extra['graph_breaks']} graph breaks")
            save()
            if args.regional:
                uncompile(model)
            if kw is not None:
                rtlynx.unsparsify(model)
            del runner
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"  ({kind}: {params / 1e9:.1f}B params, {time.time() - t0:.0f} s)", flush=True)
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
