"""Seconds per image of the whole FLUX.1-dev pipeline at 1024x1024, the fast-FLUX stack composed (issue 19 item 4);
--model qwen-image / z-image: the same for Qwen-Image and Z-Image.

    python benchmarks/stack.py [--model flux] [--steps N] [--reps 3] [--variants ...] [--time-budget 300]
    python benchmarks/stack.py --smoke       # CPU: the tiny FLUX pipeline, 4 steps, reference kernels, dynamo only

The pipelines come from benchmarks/real_pipelines.py, every module in eval mode (the runs of 2026-12-07 had the text
encoders in training mode, i.e. T5's dropout on). FLUX.1-dev: diffusers' FluxPipeline with its real configurations
and random weights, built offline on the GPU in bf16 (no checkpoint can be downloaded; time does not depend on the
weight values, so the images are noise and this file measures no quality: benchmarks/quality.py does): the
transformer (the class defaults + guidance embedding, as benchmarks/e2e.py), CLIP-L and T5-XXL text encoders (their
published configurations), the 16-channel VAE, the flow-matching scheduler with FLUX.1-dev's dynamic shift, word-level tokenizers padding to 77 and 512 tokens
(the real lengths; rtlynx.testing.word_tokenizer). One image: text encoders -> --steps transformer calls (guidance
3.5 is embedded: one call a step) -> VAE decode -> PIL. Per variant: one untimed image (compiles, the CUDA-graph
recordings of every step's graphs, kernel selection), then --reps images, each with another prompt and seed
(rtlynx.benchtools.measure, synchronised after each: host time counts), the median counts; the same images give the
median transformer step (rtlynx.pipelines.StepTimer): "forward ms".
Variants, run in the order given (dense first: every ratio is against rows of the same run):
- dense               eager bf16, SDPA
- dense compiled      torch.compile mode="reduce-overhead" (CUDA graphs) with one step mark a sampling step
                      (rtlynx.cudagraphs); --compile regional: each repeated block (minutes less compile), full: the
                      whole transformer
- recipe              the flux-fast recipe: fused Q/K/V + torchao float8 dynamic-activation / float8-weight linears
                      (row-wise) + the same compile; skipped, saying why, when torchao does not import
- rtlynx bf16         rtlynx.sparsify (default preset, norm compensation) + the same compile
- rtlynx fp8          rtlynx.sparsify(dtype="fp8") + the same compile
- rtlynx fp8 t<0.2    the same, the steps below noise level 0.2 dense (keep_dense_weights: bf16 weights there)
- rtlynx bf16 t<0.2, rtlynx fp8 + torchao (torchao FP8 on the layers rtlynx keeps dense): not in the default list
- rtlynx fp8 centred, rtlynx bf16 centred: token-mean centring (centre="token_mean", the best-quality setting on the
  mini-FLUX); not in the default list
- recipe + cache, rtlynx fp8 + cache: the same with cache-dit's DBCache on top (enabled before the compile; --smoke:
  1 front block, as the tiny FLUX has 2); not in the default list. --cache-mask: which steps are cached. "dbcache" is
  DBCache's own default (cache a step when the front blocks' residual changed by < 0.08, after 8 warm-up steps): on
  random weights the residuals never settle, and the H100 run of 2026-12-07 cached 0 of 28 steps (the "+ cache" rows
  equalled the uncached ones). The default, "medium", is cache-dit's predefined 28-step mask (15 steps computed, 13
  from the cache, a static cache there): the same steps whatever the weights, i.e. what caching saves on a real model
  that caches that often. Each "+ cache" row records how many steps its last image cached.
Every compiled variant gets the same compile mode, inductor settings (--inductor) and attention backend
(--attention, diffusers' set_attention_backend; default SDPA). --time-budget S: a variant starts only while the time
left covers the slowest variant so far, else its row says "skipped: time budget" (dense, the baseline, always runs);
rows are written as they come.
--model qwen-image: QwenImagePipeline with Qwen-Image's transformer (the class defaults), its VAE (the class defaults
of AutoencoderKLQwenImage) and a Qwen2.5-VL-7B text encoder (published configuration, vision tower included);
--model z-image: ZImagePipeline with Z-Image's transformer, the FLUX VAE and a Qwen3-4B text encoder. Both run their
pipeline's own defaults (steps and guidance; Qwen-Image without a negative prompt runs no CFG; each row's
"calls_per_step" counts the transformer calls), with word-level tokenizers, so the text is a few dozen tokens rather
than a real prompt's length. Models without fused Q/K/V (Z-Image) run the recipe unfused.
Summary (issue 19's keys, null where not measured here): forward_vs_recipe, forward_vs_dense_compiled,
pipeline_vs_recipe from "rtlynx fp8" (else the fastest rtlynx row; summary_variant names it);
pipeline_cached_vs_recipe_cached from the two "+ cache" rows; fp8_linear_* (benchmarks/fp8.py linear) stay null.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch._inductor import config as inductor_config

import rtlynx
from rtlynx import cudagraphs
from rtlynx.benchtools import fmt, measure, run_metadata
from rtlynx.pipelines import StepTimer
from rtlynx.testing import BUILDERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fp8  # noqa: E402  the torchao FP8 recipe
from real_pipelines import MODEL_NAMES, PIPELINES, default_steps, new_transformer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("dense", "dense compiled", "recipe", "rtlynx bf16", "rtlynx fp8", "rtlynx fp8 t<0.2", "rtlynx bf16 t<0.2",
            "rtlynx fp8 + torchao", "recipe + cache", "rtlynx fp8 + cache", "rtlynx fp8 centred", "rtlynx bf16 centred")
DEFAULT_VARIANTS = VARIANTS[:6]
PROMPTS = ("a red cat on a blue house", "a photo of a small dog in the sky", "a painting of a big green tree",
           "the sun on a house with a tree")
INDUCTOR_KNOBS = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "epilogue_fusion",
                  "conv_1x1_as_mm")


def torchao_status() -> str | None:
    """None when torchao's FP8 recipe can run here, else why not."""
    try:
        importlib.import_module("torchao.quantization").Float8DynamicActivationFloat8WeightConfig
    except Exception as e:  # noqa: BLE001 - an ImportError, or a torchao built for another torch
        return f"torchao does not import: {type(e).__name__}: {str(e).strip()[:160]}"
    return None


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist.replace("_", "-"))


def cache_status() -> str | None:
    """None when cache-dit imports here, else why not."""
    try:
        importlib.import_module("cache_dit")
    except Exception as e:  # noqa: BLE001 - not installed, or built for another diffusers
        return f"cache-dit does not import: {type(e).__name__}: {str(e).strip()[:160]}"
    return None


def _needs(name: str) -> str | None:
    """Why variant ``name`` cannot run here (None: it can)."""
    if name.startswith("recipe") or name.endswith("+ torchao"):
        if torchao_status():
            return torchao_status()
    return cache_status() if name.endswith("+ cache") else None


def prepare(pipe, name: str, args) -> None:
    """Turn the pipeline's eager dense transformer into variant ``name`` (compile included)."""
    tr = pipe.transformer
    cached = name.endswith(" + cache")
    name = name.removesuffix(" + cache")
    if name == "recipe":
        if hasattr(tr, "fuse_qkv_projections"):  # Z-Image has none: its recipe row runs unfused
            tr.fuse_qkv_projections()
        fp8._torchao_fp8(tr, only_plain_linear=False)
    elif name.startswith("rtlynx"):
        fp8_sites = "fp8" in name
        rtlynx.sparsify(tr, backend=args.backend, dtype="fp8" if fp8_sites else "native",
                        dense_below_t=0.2 if "t<0.2" in name else None,
                        keep_dense_weights=fp8_sites and "t<0.2" in name,
                        centre="token_mean" if name.endswith("centred") else None)
        if name.endswith("+ torchao"):
            fp8._torchao_fp8(tr, only_plain_linear=True)  # exact nn.Linear only: nothing rtlynx runs
    if cached:  # before the compile: cache-dit wraps the block lists the regional compile finds
        import cache_dit

        kw = {"Fn_compute_blocks": 1} if args.smoke else {}
        # a fixed step mask: the cached steps do not depend on the weights (cache-dit has masks for these counts)
        if args.cache_mask != "dbcache" and (args.steps >= 8 or args.steps in (4, 6)):
            kw.update(steps_computation_mask=cache_dit.steps_mask(mask_policy=args.cache_mask, total_steps=args.steps),
                      steps_computation_policy="static")
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**kw))
    for knob, value in args.inductor_values.items():  # torchao's quantize_ changes them: every variant gets the same
        setattr(inductor_config, knob, value)
    if name != "dense":
        kw = {"backend": "eager", "mode": None} if args.smoke else {"mode": "reduce-overhead"}
        cudagraphs.compile(pipe, regional=args.compile == "regional", **kw)


def restore(pipe, name: str, device: str, args) -> None:
    """Back to the eager dense transformer (a fresh one where a variant changed it for good)."""
    cudagraphs.uncompile(pipe)
    torch._dynamo.reset()
    if name.endswith(" + cache"):
        import cache_dit

        cache_dit.disable_cache(pipe)
        name = name.removesuffix(" + cache")
    if (name == "recipe" or name.endswith("+ torchao")) and torchao_status() is None:
        pipe.transformer = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        pipe.transformer = new_transformer(device, args.model, tiny=args.smoke)
        if args.attention:
            pipe.transformer.set_attention_backend(args.attention)
    elif rtlynx.sparse_layers(pipe.transformer):
        rtlynx.unsparsify(pipe.transformer)


def time_images(pipe, args, device: str) -> dict:
    """One untimed image, then the median of --reps images and the median transformer step over them."""
    size = 32 if args.smoke else 1024
    # FLUX: guidance 3.5 as its model card, T5 padded to 512 (tiny: to its tokenizer's length); the others: defaults
    kw = (dict(guidance_scale=3.5, max_sequence_length=min(512, pipe.tokenizer_2.model_max_length))
          if args.model == "flux" else {})

    def image(i: int):
        with torch.no_grad():
            return pipe(prompt=PROMPTS[i % len(PROMPTS)], height=size, width=size, num_inference_steps=args.steps,
                        output_type="pil", generator=torch.Generator("cpu").manual_seed(i), **kw).images[0]

    t0 = time.time()
    image(len(PROMPTS))  # warm-up: compiles, records the CUDA graphs of every step (both sides of a schedule)
    warm = time.time() - t0
    fns = [lambda i=i: image(i) for i in range(len(PROMPTS))]
    calls = [0]  # transformer calls (CFG: two a step)
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with StepTimer(pipe.transformer) as timer:
            t = measure(fns, reps=args.reps, warmup=0, flush_l2=False, sync_each=True, cuda=device == "cuda")
    finally:
        hook.remove()
    steps = sorted(timer.steps)
    return {"s_per_image": t.median_ms / 1e3, "s_min": t.min_ms / 1e3, "s_max": t.max_ms / 1e3, "reps": t.reps,
            "forward_ms": 1e3 * steps[len(steps) // 2], "warmup_s": round(warm, 1),
            "calls_per_step": calls[0] / (t.reps * args.steps)}


def summarize(rows: list[dict]) -> dict:
    ok = {r["variant"]: r for r in rows if "s_per_image" in r}
    lynx = ok.get("rtlynx fp8") or min((r for n, r in ok.items() if n.startswith("rtlynx") and "cache" not in n),
                                       key=lambda r: r["s_per_image"], default=None)

    def ratio(base: str, key: str):
        b = ok.get(base)
        return b[key] / lynx[key] if b and lynx else None

    return {"summary_variant": lynx and lynx["variant"],
            "forward_vs_recipe": ratio("recipe", "forward_ms"),
            "forward_vs_dense_compiled": ratio("dense compiled", "forward_ms"),
            "pipeline_vs_recipe": ratio("recipe", "s_per_image"),
            "pipeline_vs_dense_compiled": ratio("dense compiled", "s_per_image"),
            "pipeline_vs_dense": ratio("dense", "s_per_image"),
            "pipeline_cached_vs_recipe_cached": (ok["recipe + cache"]["s_per_image"] / ok["rtlynx fp8 + cache"]["s_per_image"]
                                                 if {"recipe + cache", "rtlynx fp8 + cache"} <= set(ok) else None),
            "fp8_linear_vs_bf16_large": None,
            "fp8_linear_vs_fp8_dense_large": None}


def add_ratios(rows: list[dict]) -> None:
    ok = {r["variant"]: r for r in rows if "s_per_image" in r}
    for r in ok.values():
        for base in ("dense", "dense compiled", "recipe"):
            if base in ok:
                r[f"vs_{base.replace(' ', '_')}"] = ok[base]["s_per_image"] / r["s_per_image"]
                r[f"forward_vs_{base.replace(' ', '_')}"] = ok[base]["forward_ms"] / r["forward_ms"]


def table(rows: list[dict]) -> str:
    lines = [f"{'variant':22s} {'s/image':>8s} {'step ms':>8s} {'vs dense':>9s} {'vs dense comp':>13s} "
             f"{'vs recipe':>9s}"]
    for r in rows:
        if "s_per_image" not in r:
            lines.append(f"{r['variant']:22s} {r.get('skipped') or r.get('error')}")
            continue
        lines.append(f"{r['variant']:22s} {r['s_per_image']:8.3f} {r['forward_ms']:8.1f} "
                     f"{fmt(r.get('vs_dense')):>8s}x {fmt(r.get('vs_dense_compiled')):>12s}x "
                     f"{fmt(r.get('vs_recipe')):>8s}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(MODEL_NAMES), default="flux", help="the pipeline (module docstring)")
    ap.add_argument("--steps", type=int, default=None,
                    help="sampling steps (default: the pipeline's own: 28 FLUX.1-dev, 50 Qwen-Image and Z-Image)")
    ap.add_argument("--reps", type=int, default=3, help="timed images per variant (median)")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                    help="in this order (dense first: the ratios need it)")
    ap.add_argument("--compile", choices=("regional", "full"), default="regional",
                    help="compile each repeated block (fast to compile) or the whole transformer")
    ap.add_argument("--inductor", choices=("default", "recipe"), default="default",
                    help="inductor settings for every variant: its defaults, or the recipe's (coordinate-descent "
                         "tuning: minutes more compile)")
    ap.add_argument("--attention", default=None, help="diffusers attention backend for every variant (default: SDPA)")
    ap.add_argument("--cache-mask", choices=("dbcache", "slow", "medium", "fast", "ultra"), default="medium",
                    help="the '+ cache' rows' cached steps: DBCache's residual threshold, or one of cache-dit's "
                         "predefined step masks (random weights: see the module docstring)")
    ap.add_argument("--backend", default="lynx", help="rtlynx kernel backend (--smoke: reference)")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds for the whole run (0: no limit)")
    ap.add_argument("--out", default=None, help="results JSON (default: results/stack_<device>.json)")
    ap.add_argument("--smoke", action="store_true", help="the CPU path: tiny pipeline, 4 steps, 2 reps")
    args = ap.parse_args(argv)
    start = time.time()
    if args.smoke:
        args.backend, args.steps, args.reps, device = "reference", min(args.steps or 4, 4), min(args.reps, 2), "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/stack.py needs a CUDA GPU (--smoke checks the script on a CPU)")
    else:
        device = "cuda"
    if args.variants[0] != "dense":
        args.variants = ["dense", *[v for v in args.variants if v != "dense"]]
    if args.inductor == "recipe":
        args.inductor_values = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True,
                                "epilogue_fusion": False, "conv_1x1_as_mm": True}  # flux-fast's settings
    else:
        args.inductor_values = {k: getattr(inductor_config, k) for k in INDUCTOR_KNOBS}
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    model = "" if args.model == "flux" else args.model.replace("-", "_") + "_"
    out = Path(args.out or RESULTS / f"stack_{model}{gpu.replace(' ', '_')}.json")
    if args.smoke:
        torch.manual_seed(0)
        pipe = BUILDERS[args.model]()
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = PIPELINES[args.model](device)
    args.steps = args.steps or default_steps(pipe)
    rows: list[dict] = []
    title = MODEL_NAMES[args.model]
    doc = {**run_metadata(), "device": gpu, "pipeline": f"tiny {title}" if args.smoke else f"{title} (random weights)",
           "resolution": "32x32" if args.smoke else "1024x1024", "steps": args.steps, "reps": args.reps,
           "compile": f"{args.compile}, mode reduce-overhead" if not args.smoke else f"{args.compile}, dynamo only",
           "inductor": {"settings": args.inductor, **args.inductor_values}, "attention": args.attention or "native",
           "torchao": torchao_status() or "ok", "cache_dit": cache_status() or _version("cache_dit"),
           "cache_mask": args.cache_mask, "rows": rows}

    def save():
        add_ratios(rows)
        doc["summary"] = summarize(rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))

    if args.attention:
        pipe.transformer.set_attention_backend(args.attention)
    doc["build_s"] = round(time.time() - start, 1)
    print(f"{gpu}: {doc['pipeline']} {doc['resolution']}, {args.steps} steps, median of {args.reps} images "
          f"(built in {doc['build_s']} s)", flush=True)
    slowest = 0.0
    for name in args.variants:
        left = args.time_budget - (time.time() - start)
        skip = _needs(name)
        if not skip and args.time_budget and name != "dense" and left < slowest:  # the baseline always runs
            skip = f"time budget ({left:.0f} s left, the slowest variant took {slowest:.0f} s)"
        if skip:
            rows.append({"variant": name, "skipped": skip})
            save()
            continue
        t0 = time.time()
        row = {"variant": name}
        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                prepare(pipe, name, args)
                row["prepare_s"] = round(time.time() - t0, 1)
                row.update(time_images(pipe, args, device))
                if name.endswith(" + cache"):  # what the cache skipped (the last image's steps)
                    import cache_dit

                    row["cached_steps"] = len(cache_dit.summary(pipe, logging=False)[0].cached_steps)
            row["warnings"] = sorted({str(w.message)[:160] for w in caught})[:8]
            if device == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as e:  # noqa: BLE001 - keep the rows already measured
            row["error"] = f"{type(e).__name__}: {str(e).strip()[:400]}"
        finally:
            row["wall_s"] = round(time.time() - t0, 1)
            slowest = max(slowest, row["wall_s"])
            rows.append(row)
            save()
            restore(pipe, name, device, args)
        print(json.dumps({k: v for k, v in row.items() if k != "warnings"}), flush=True)
    print(table(rows))
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
