"""End-to-end transformer forward time at the real model sizes (GPU): dense vs RT-Lynx on the lynx kernels.

No checkpoint can be downloaded here, so each model is the diffusers class with its real configuration
(FLUX.1-dev, Qwen-Image, Z-Image: the class defaults) and random weights; time does not depend on the
weight values. One forward = one sampling step at 1024x1024 (4096 image tokens) with a 512-token prompt,
batch 1, bf16. Each row is the median of --reps forwards (CUDA events) after warm-up; the speed-up is
against the dense forward of the same model in the same run.

    python benchmarks/e2e.py [--models flux qwen-image z-image] [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

import rtlynx
from rtlynx.integrations.diffusers import example_inputs

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # kind -> (class, config overrides on the class defaults, example_inputs size for 1024x1024)
    "flux": ("FluxTransformer2DModel", dict(guidance_embeds=True), dict(height=64, width=64)),
    "qwen-image": ("QwenImageTransformer2DModel", {}, dict(height=128, width=128)),
    "z-image": ("ZImageTransformer2DModel", {}, dict(height=128, width=128)),
}
VARIANTS = {  # name -> sparsify kwargs (None: dense)
    "dense": None,
    "rtlynx (preset default, norm)": dict(),
    "rtlynx + LoRA r64": dict(lora_rank=64),
    "rtlynx, paper preset + LoRA r64": dict(preset="paper", lora_rank=64),
}


def build(kind: str, device: str = "cuda", tiny: bool = False):
    import diffusers

    from rtlynx.integrations.diffusers import TINY_CONFIGS

    cls_name, cfg, _ = MODELS[kind]
    cfg = TINY_CONFIGS[kind][1] if tiny else cfg
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


def time_forward(model, inputs, reps: int) -> list[float]:
    with torch.no_grad():
        for _ in range(3):
            model(**inputs)
        if not torch.cuda.is_available():  # CPU smoke run: wall clock
            t = time.perf_counter()
            model(**inputs)
            return [1e3 * (time.perf_counter() - t)]
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model(**inputs)
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
    return out


def kernel_table(model, inputs, top: int = 12) -> tuple[float, list[dict]]:
    """One profiled forward: (wall ms, the CUDA kernels by total time)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        model(**inputs)
        torch.cuda.synchronize()
        wall = 1e3 * (time.perf_counter() - t)
    rows = [dict(kernel=e.key[:110], calls=e.count, ms=e.self_device_time_total / 1e3)
            for e in prof.key_averages() if e.self_device_time_total > 0 and e.device_type.name == "CUDA"]
    rows.sort(key=lambda r: -r["ms"])
    return wall, rows[:top] + [dict(kernel="(all kernels)", calls=sum(r["calls"] for r in rows),
                                    ms=sum(r["ms"] for r in rows))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--backend", default="lynx")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each variant (fuses diffusers' elementwise work; the lynx ops trace as custom ops)")
    ap.add_argument("--profile", action="store_true", help="also print each variant's top CUDA kernels")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU, reference backend (checks the script)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.backend, args.text_len = "reference", 8
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/e2e.py needs a CUDA GPU (--smoke checks the script on a CPU)")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = []
    print(f"{'model':11s} {'variant':34s} {'ms/forward':>10s} {'speed-up':>8s} {'sparse FLOP share':>17s}")
    for kind in args.models:
        t0 = time.time()
        model = build(kind, "cpu" if args.smoke else "cuda", tiny=args.smoke)
        size = dict(height=8, width=8) if args.smoke else MODELS[kind][2]
        inputs = example_inputs(model, batch=1, text_len=args.text_len, **size)
        if getattr(model.config, "guidance_embeds", False) and kind == "flux":  # FLUX.1-dev is guidance-distilled
            inputs["guidance"] = torch.full((1,), 3.5, device=inputs["timestep"].device)
        params = sum(p.numel() for p in model.parameters())
        dense_ms = None
        for vname, kw in VARIANTS.items():
            if vname not in args.variants and kw is not None:
                continue
            if kw is not None:
                preset = {"paper": f"{kind}-paper"}.get(kw.get("preset"), "auto")
                rtlynx.sparsify(model, backend=args.backend, **{**kw, "preset": preset})
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            runner = model
            if args.compile:
                torch._dynamo.reset()
                runner = torch.compile(model)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tc = time.time()
                ms = statistics.median(time_forward(runner, inputs, args.reps))
                if args.compile:
                    from torch._dynamo.utils import counters
                    breaks = sum(counters["graph_break"].values())
                    print(f"  ({vname}: compile + timing {time.time() - tc:.0f} s, {breaks} graph breaks: "
                          f"{sorted(counters['graph_break'])[:3]})", flush=True)
            profile = None
            if args.profile and torch.cuda.is_available():
                try:
                    wall, kernels = kernel_table(model, inputs)
                except Exception as e:  # a profiler problem must not lose the timings
                    print(f"  profile failed: {e!r}")
                else:
                    profile = dict(wall_ms=wall, kernels=kernels)
                    print(f"  profile {kind} / {vname}: wall {wall:.1f} ms")
                    for r in kernels:
                        print(f"    {r['ms']:8.2f} ms {r['calls']:5d}x  {r['kernel']}")
            share = None
            if kw is not None:
                share = rtlynx.summary(model, **inputs).sparse_flop_share
            fallbacks = sorted({str(w.message)[:160] for w in caught})
            dense_ms = dense_ms or ms
            row = dict(model=kind, variant=vname, params=params, ms=ms, speedup=dense_ms / ms,
                       sparse_flop_share=share, peak_gib=torch.cuda.max_memory_allocated() / 2**30
                       if torch.cuda.is_available() else None, tokens=inputs_tokens(kind, inputs), fallback_warnings=fallbacks,
                       **({"profile": profile} if profile else {}))
            rows.append(row)
            print(f"{kind:11s} {vname:34s} {ms:10.2f} {dense_ms / ms:8.3f}x "
                  f"{'' if share is None else f'{100 * share:16.1f}%'}"
                  + (f"  warnings: {fallbacks}" if fallbacks else ""), flush=True)
            if kw is not None:
                rtlynx.unsparsify(model)
        del model
        torch.cuda.empty_cache()
        print(f"  ({kind}: {params / 1e9:.1f}B params, {time.time() - t0:.0f} s)", flush=True)
    out = Path(args.out or RESULTS / f"e2e_{gpu.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": gpu, "torch": torch.__version__, "backend": args.backend,
                               "compiled": args.compile,
                               "resolution": "1024x1024 (4096 image tokens)", "text_len": args.text_len,
                               "reps": args.reps, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


def inputs_tokens(kind, inputs) -> int:
    if kind == "z-image":
        x = inputs["x"][0]
        return x.shape[-1] * x.shape[-2] // 4
    return inputs["hidden_states"].shape[1]


if __name__ == "__main__":
    raise SystemExit(main())
