"""A user's LoRA on FLUX.1-dev (GPU, compiled): what a rank-16 adapter costs on dense and on rtlynx, and recompiles.

The model is diffusers' FluxTransformer2DModel with the FLUX.1-dev configuration and random weights (as
benchmarks/e2e.py: nothing can be downloaded; time does not depend on the values), one forward at 1024x1024 (4096
image tokens, 512 text tokens, batch 1, bf16), torch.compile (inductor; --mode reduce-overhead: with CUDA graphs,
each timed forward a step of its own). The adapter is a rank-16 LoRA
with random factors on every token linear of the blocks (attention Q/K/V/out of both streams, the MLPs; what style
LoRAs for FLUX train), loaded the diffusers way (``enable_lora_hotswap(target_rank=16)``, ``load_lora_adapter``).

Variants, each the median of --reps compiled forwards after warm-up (rtlynx.benchtools.measure, CUDA events):
dense, dense + LoRA (PEFT's GEMMs), rtlynx bf16 and FP8 sites, each without and with the adapter (on the lynx
kernels the adapter rides in the sparse GEMM's LoRA tail: rtlynx.sites.adapters; on the layers rtlynx keeps dense
it is PEFT's GEMMs); the "comp r8" rows the same with the rank-8 compensation LoRA of the quality runs (the plain
rtlynx rows have none). After timing a variant with the adapter: a hotswap to another adapter of the same rank and a
set_adapters weight change, each followed by one compiled forward; the new graphs are counted.

    python benchmarks/user_lora.py                          # every variant (about 2 minutes of compiling each)
    python benchmarks/user_lora.py --variants dense "dense + LoRA r16"   # rows merge into one file per device
    python benchmarks/user_lora.py --smoke                  # tiny FLUX on the CPU (checks the script)

Writes benchmarks/results/user_lora_<device>.json: "device", commit, kernel library (sha256), rows (each with the
commit it was measured at: rows of earlier runs stay), and "summary":
adapter_cost_bf16 / adapter_cost_fp8 (time with the adapter / without - 1, rtlynx), adapter_cost_dense (the same for
the dense model), adapter_cost_{bf16,fp8}_comp_r8 (the same on sites with the compensation LoRA), speedup_vs_dense_lora_bf16 / _fp8, recompiles_on_hotswap (new graphs after the hotswaps, rtlynx
variants), recompiles_on_set_adapters.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's rtlynx; benchmarks/e2e.py's model builder

import rtlynx  # noqa: E402
from rtlynx._compile import mark_step, uncompile  # noqa: E402
from rtlynx.benchtools import kernel_library, measure, run_metadata  # noqa: E402
from rtlynx.integrations.diffusers import example_inputs, output_tensor  # noqa: E402

from e2e import build, device_and_results, time_split  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RANK = 16
# the token linears of FLUX's blocks (PEFT matches a string as a regex on the whole module name)
TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
           r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)")
VARIANTS = {  # name -> (sparsify kwargs or None for dense, with the adapter)
    "dense": (None, False),
    "dense + LoRA r16": (None, True),
    "rtlynx bf16": (dict(dtype="native"), False),
    "rtlynx bf16 + LoRA r16": (dict(dtype="native"), True),
    "rtlynx fp8": (dict(dtype="fp8"), False),
    "rtlynx fp8 + LoRA r16": (dict(dtype="fp8"), True),
    # with the rank-8 compensation LoRA of the quality runs (the rows above have none): the adapter widens a tail
    # that is already there, which is what a user of the FID configuration pays
    "rtlynx bf16 comp r8": (dict(dtype="native", lora_rank=8), False),
    "rtlynx bf16 comp r8 + LoRA r16": (dict(dtype="native", lora_rank=8), True),
    "rtlynx fp8 comp r8": (dict(dtype="fp8", lora_rank=8), False),
    "rtlynx fp8 comp r8 + LoRA r16": (dict(dtype="fp8", lora_rank=8), True),
}


def device_tag(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100"; "cpu" stays."""
    m = re.search(r"\b([A-Z]\d{2,4})\b", name)
    return m.group(1).lower() if m else re.sub(r"\W+", "_", name).strip("_").lower()


def adapter_state(model, seed: int) -> dict:
    """A rank-16 LoRA on TARGETS in PEFT's key format, random factors (A like nn.Linear's init, B small)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, rtlynx.SparseActLinear)) and re.fullmatch(TARGETS, name):
            dev, dt = mod.weight.device, getattr(mod, "compute_dtype", mod.weight.dtype)
            sd[f"{name}.lora_A.weight"] = (torch.randn(RANK, mod.in_features, generator=g)
                                           * mod.in_features ** -0.5).to(dev, dt)
            sd[f"{name}.lora_B.weight"] = (torch.randn(mod.out_features, RANK, generator=g) * 0.01).to(dev, dt)
    return sd


def counting(backend: str, graphs: list, mode: str = "default"):
    """A torch.compile backend that counts the graphs it compiles, then hands them to ``backend``; ``mode``
    "reduce-overhead": inductor with CUDA graphs (what torch.compile's mode sets, which a custom backend cannot take)."""
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(backend)
    if mode == "reduce-overhead" and backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        def inner(gm, example_inputs):  # noqa: F811 - the CUDA-graph flavour of the same backend
            return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})

    def compile_graph(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    return compile_graph


def run_variant(model, inputs, name: str, args, adapters: tuple[dict, dict]) -> dict:
    sparsify_kw, with_lora = VARIANTS[name]
    if sparsify_kw is not None:
        rtlynx.sparsify(model, backend=args.backend, **sparsify_kw)
    if with_lora:
        model.enable_lora_hotswap(target_rank=RANK)
        model.load_lora_adapter(adapters[0], adapter_name="style", prefix=None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    graphs: list = []
    backend = counting(args.compile_backend, graphs, args.mode)
    if args.compile == "regional":  # diffusers' regional compile: one graph per block class, compiled in seconds
        model.compile_repeated_blocks(backend=backend)
        runner = model
    else:
        runner = torch.compile(model, backend=backend)
    graphed = args.mode == "reduce-overhead"

    def forward():
        if graphed:  # a timing loop is no sampler: each forward is a CUDA-graph step of its own (rtlynx.cudagraphs)
            mark_step()
        with torch.no_grad():
            return output_tensor(runner(**inputs))

    row = dict(variant=name, sparse=sparsify_kw is not None, lora=with_lora, compile=args.compile, mode=args.mode,
               commit=run_metadata().get("commit"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.time()
        row["ms"] = measure(forward, reps=args.reps, warmup=args.warmup, flush_l2=False, sync_each=True).median_ms
        row["compile_and_time_s"] = round(time.time() - t0, 1)
        row["graphs"] = len(graphs)
        if args.profile:  # after the timing: one profiled forward, GPU time per kernel class (what an adapter adds)
            try:
                row["split"] = time_split(runner, inputs)
            except Exception as e:  # noqa: BLE001 - a profiler problem must not lose the timing
                row["split"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        if with_lora:
            before = len(graphs)
            model.load_lora_adapter(adapters[1], adapter_name="style", prefix=None, hotswap=True)
            forward()
            row["recompiles_on_hotswap"] = len(graphs) - before
            before = len(graphs)
            model.set_adapters(["style"], weights=[0.7])
            forward()
            row["recompiles_on_set_adapters"] = len(graphs) - before
    row["warnings"] = sorted({str(w.message)[:160] for w in caught})
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if sparsify_kw is not None:
        carried = sum(sum(s._carry) for s in rtlynx.sites.model_sites(model))
        row["adapter_layers_in_tail"] = carried
        row["sparse_layers"] = len(rtlynx.sparse_layers(model))
    if with_lora:
        model.unload_lora()
    if sparsify_kw is not None:
        rtlynx.unsparsify(model)
    uncompile(model)  # regional: the blocks' compiled wrappers go, so the next variant compiles afresh
    torch._dynamo.reset()
    return row


def summarize(rows: dict) -> dict:
    def ms(name):
        return rows[name]["ms"] if name in rows else None

    def cost(plain, lora):
        return None if ms(plain) is None or ms(lora) is None else ms(lora) / ms(plain) - 1

    def speedup(lora):
        return None if ms(lora) is None or ms("dense + LoRA r16") is None else ms("dense + LoRA r16") / ms(lora)

    swaps = [rows[n].get("recompiles_on_hotswap") for n in rows if rows[n].get("lora") and rows[n]["sparse"]]
    sets = [rows[n].get("recompiles_on_set_adapters") for n in rows if rows[n].get("lora") and rows[n]["sparse"]]
    return {"adapter_cost_bf16": cost("rtlynx bf16", "rtlynx bf16 + LoRA r16"),
            "adapter_cost_fp8": cost("rtlynx fp8", "rtlynx fp8 + LoRA r16"),
            "adapter_cost_dense": cost("dense", "dense + LoRA r16"),
            "adapter_cost_bf16_comp_r8": cost("rtlynx bf16 comp r8", "rtlynx bf16 comp r8 + LoRA r16"),
            "adapter_cost_fp8_comp_r8": cost("rtlynx fp8 comp r8", "rtlynx fp8 comp r8 + LoRA r16"),
            "speedup_vs_dense_lora_bf16": speedup("rtlynx bf16 + LoRA r16"),
            "speedup_vs_dense_lora_fp8": speedup("rtlynx fp8 + LoRA r16"),
            "recompiles_on_hotswap": sum(swaps) if swaps else None,
            "recompiles_on_set_adapters": sum(sets) if sets else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--backend", default="lynx", help="rtlynx backend of the sparse layers")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile", choices=("full", "regional"), default="full",
                    help="torch.compile of the whole model, or diffusers' compile_repeated_blocks (minutes less)")
    ap.add_argument("--mode", choices=("default", "reduce-overhead"), default="default",
                    help="reduce-overhead: every variant under CUDA graphs (inductor), so that host time per launch "
                         "does not blur the adapter's cost")
    ap.add_argument("--profile", action="store_true", help="after timing each variant, one profiled forward: GPU ms "
                                                           "per kernel class and the top kernels (the row's split)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny FLUX on the CPU, reference backend, dynamo's eager "
                                                         "backend (checks the script)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.backend, args.compile_backend, args.text_len = "reference", "eager", 8
        args.reps, args.warmup = min(args.reps, 3), 1
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/user_lora.py needs a CUDA GPU (--smoke checks the script on a CPU)")
    smoke = "_smoke" if args.smoke else ""
    dev, out, doc = device_and_results(args.out, lambda name: RESULTS / f"user_lora_{device_tag(name)}{smoke}.json")
    rows = {r["variant"]: r for r in doc.get("rows", [])}
    other = {(r.get("compile", "full"), r.get("mode", "default")) for r in rows.values()} - {(args.compile, args.mode)}
    if other:  # the summary's ratios compare rows: one compile mode per file
        c, m = other.pop()
        raise SystemExit(f"{out} holds rows compiled {c} / mode {m}, this run is --compile {args.compile} / --mode "
                         f"{args.mode}: pass --out")

    model = build("flux", "cpu" if args.smoke else "cuda", tiny=args.smoke)
    model.requires_grad_(False)
    if args.smoke:
        model = model.to(torch.bfloat16)
    size = dict(height=8, width=8) if args.smoke else dict(height=64, width=64)
    inputs = example_inputs(model, batch=1, text_len=args.text_len, **size)
    if getattr(model.config, "guidance_embeds", False):  # FLUX.1-dev is guidance-distilled
        inputs["guidance"] = torch.full((1,), 3.5, device=inputs["timestep"].device, dtype=inputs["timestep"].dtype)
    adapters = (adapter_state(model, 1), adapter_state(model, 2))
    print(f"{dev}, compiled ({args.compile_backend}), median of {args.reps}; adapter rank {RANK} on "
          f"{len(adapters[0]) // 2} layers")
    for name in sorted(args.variants, key=list(VARIANTS).index):  # dense first: FP8 storage changes the weights
        row = run_variant(model, inputs, name, args, adapters)
        rows[name] = row
        extra = "".join(f", {k} {row[k]}" for k in ("recompiles_on_hotswap", "recompiles_on_set_adapters",
                                                     "adapter_layers_in_tail") if k in row)
        print(f"{name:31s} {row['ms']:9.2f} ms  ({row['compile_and_time_s']} s{extra})", flush=True)
        doc.update({**run_metadata(), "device": dev, "kernel_library": kernel_library() or doc.get("kernel_library"),
                    "model": "FluxTransformer2DModel, FLUX.1-dev config, random weights",
                    "resolution": "1024x1024 (4096 image tokens)" if not args.smoke else "tiny (smoke)",
                    "text_len": args.text_len, "batch": 1, "dtype": "bfloat16", "backend": args.backend,
                    "compile_backend": args.compile_backend,
                    "adapter": {"rank": RANK, "targets": TARGETS, "layers": len(adapters[0]) // 2},
                    "rows": [rows[n] for n in VARIANTS if n in rows], "summary": summarize(rows)})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
