"""One transformer forward on one and on two GPUs (diffusers' own parallelism): dense vs RT-Lynx.

Full-size models with random weights (no checkpoint can be downloaded here), bf16, built directly on each GPU as
benchmarks/e2e.py does; rank 0's weights are broadcast so every rank holds the same model:

- FLUX.1-dev at 2048x2048 (128x128 latent patches = 16384 image tokens) with a 512-token prompt;
- Wan2.1-14B at 832x480x81 (21 x 60 x 104 latent, 1x2x2 patches = 32760 tokens) with a 512-token prompt.

Per model, in one process per GPU (``torchrun --nproc_per_node=2``):

1. "1 GPU": every rank runs the whole model on its own GPU, no communication (the same work as a single-GPU run);
   dense, then RT-Lynx (``rtlynx.sparsify``, default preset, lynx kernels).
2. "CP x2": ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`` (``--cp ring``: ring
   attention, on the cuDNN attention backend for every row of that model); dense, then RT-Lynx.
3. "TP x2" (models whose diffusers class has a ``_tp_plan``: FLUX): a fresh model,
   ``TensorParallelConfig(tp_degree=2)``, dense, then RT-Lynx sparsified on the sharded model (rtlynx.parallel).

Each row: median ms of ``--reps`` forwards after warm-up (rank 0; the slowest rank's median too), peak memory, the
speed-up of RT-Lynx over dense of the same parallel mode, the scaling over 1 GPU (and its efficiency, scaling / 2)
and, for two GPUs, the relative L2 error of the output against the 1-GPU output of the same variant (same weights,
same inputs). A 2-GPU RT-Lynx row is "ok" when its error is at most max(2e-2, 2 x the dense row's error).
Rows merge into ``--out`` (default benchmarks/results/multi_gpu_<device>.json), saved after every row.

    torchrun --nproc_per_node=2 benchmarks/multi_gpu.py                 # both models, 1 GPU + CP (+ TP for FLUX)
    torchrun --nproc_per_node=2 benchmarks/multi_gpu.py --models wan --modes single cp
    python benchmarks/multi_gpu.py --models flux                        # one GPU: the 1-GPU rows only
    torchrun --nproc_per_node=2 benchmarks/multi_gpu.py --smoke         # tiny models, CPU, gloo: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import rtlynx
from rtlynx import parallel
from rtlynx.benchtools import run_metadata
from rtlynx.integrations.diffusers import TINY_CONFIGS, TINY_VIDEO_CONFIGS, example_inputs, output_tensor

from e2e import build_model, time_forward

RESULTS = Path(__file__).resolve().parent / "results"
WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40)  # Wan2.1-T2V-14B (the class defaults)
MODELS = {  # kind -> class, full-size config, example_inputs size, what the size means, tiny config / size (--smoke)
    "flux": dict(cls="FluxTransformer2DModel", config=dict(guidance_embeds=True), size=dict(height=128, width=128),
                 shape="2048x2048 (16384 image tokens)", tiny=TINY_CONFIGS["flux"][1],
                 tiny_size=dict(height=8, width=8)),
    "wan": dict(cls="WanTransformer3DModel", config=WAN_14B, size=dict(frames=21, height=60, width=104),
                shape="832x480x81 (21x60x104 latent, 32760 tokens)", tiny=TINY_VIDEO_CONFIGS["wan"][1],
                tiny_size=dict(frames=2, height=8, width=8)),
}
ERR_FLOOR = 2e-2  # relative L2 error of a whole bf16 forward that still counts as equal


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Run:
    """The distributed context of this process: rank, world, device; collectives are no-ops on one process."""

    def __init__(self, smoke: bool):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if smoke:
            parallel.allow_cpu_parallelism()
            self.device = torch.device("cpu")
        else:
            if not torch.cuda.is_available():
                raise SystemExit("benchmarks/multi_gpu.py needs CUDA GPUs (--smoke checks the script on a CPU)")
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("gloo" if smoke else "nccl", rank=self.rank, world_size=self.world)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def broadcast(self, model):
        if self.world > 1:
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, 0)

    def max(self, v: float) -> float:
        if self.world == 1:
            return v
        t = torch.tensor([v], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)


def build(kind: str, run: Run, smoke: bool, attention: str | None):
    spec = MODELS[kind]
    torch.manual_seed(0)
    model = build_model(spec["cls"], spec["tiny"] if smoke else spec["config"], str(run.device))
    run.broadcast(model)  # rank 0's weights everywhere (the same seed already gives them; this makes sure)
    if attention:
        model.set_attention_backend(attention)
    size = spec["tiny_size"] if smoke else spec["size"]
    inputs = example_inputs(model, batch=1, text_len=8 if smoke else 512, seed=1, **size)
    if getattr(model.config, "guidance_embeds", False):  # FLUX.1-dev is guidance-distilled
        inputs["guidance"] = torch.full((1,), 3.5, device=run.device)
    return model, inputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--modes", nargs="+", default=["single", "cp", "tp"], choices=["single", "cp", "tp"])
    ap.add_argument("--cp", default="ulysses", choices=["ulysses", "ring"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="lynx")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU, reference backend, gloo")
    args = ap.parse_args(argv)
    if args.smoke:
        args.backend = "reference"
    run = Run(args.smoke)
    dev_name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
    out = Path(args.out or RESULTS / f"multi_gpu_{dev_name.replace(' ', '_')}.json")
    doc = json.loads(out.read_text()) if out.exists() and run.rank == 0 else {}
    if doc.get("device") not in (None, dev_name):
        raise SystemExit(f"{out} holds rows of {doc['device']}, this is {dev_name}: pass another --out")
    rows = doc.get("rows", [])
    attention = "_native_cudnn" if args.cp == "ring" else None
    cp_name = f"CP x{run.world} ({args.cp})"

    def save():
        if run.rank != 0:
            return
        doc.update({**run_metadata(), "device": dev_name, "backend": args.backend,
                    "reps": args.reps, "dtype": "bfloat16", "batch": 1, "text_len": 8 if args.smoke else 512,
                    "shapes": {k: MODELS[k]["shape"] for k in MODELS}, "err_floor": ERR_FLOOR,
                    "diffusers": __import__("diffusers").__version__, "rows": rows, "summary": summarize(rows)})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))

    def row(kind, mode, variant, model, inputs, ref=None):
        """Time one forward and record the row; returns the output (on the CPU)."""
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        run.barrier()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ms = time_forward(model, inputs, args.reps)
            with torch.no_grad():
                y = output_tensor(model(**inputs)).float().cpu()
        peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
        r = dict(model=kind, mode=mode, variant=variant, processes=run.world, time=time.strftime("%Y-%m-%d %H:%M"),
                 ms=ms, ms_slowest_rank=run.max(ms), peak_gib=peak, shape=MODELS[kind]["shape"],
                 warnings=sorted({str(w.message)[:160] for w in caught}))
        if ref is not None:
            r["rel_err_vs_1gpu"] = _rel(y, ref)
        rows[:] = [x for x in rows if (x["model"], x["mode"], x["variant"]) != (kind, mode, variant)]
        rows.append(r)
        if run.rank == 0:
            err = f"  err vs 1 GPU {r['rel_err_vs_1gpu']:.2e}" if ref is not None else ""
            print(f"{kind:5s} {mode:20s} {variant:7s} {ms:9.2f} ms (slowest rank {r['ms_slowest_rank']:9.2f})"
                  f"{'' if peak is None else f'  {peak:6.2f} GiB'}{err}", flush=True)
        save()
        return y

    if run.rank == 0:
        print(f"{dev_name} x{run.world}, median of {args.reps} forwards, backend {args.backend}")
    for kind in args.models:
        t0 = time.time()
        model, inputs = build(kind, run, args.smoke, attention)
        ref = {}
        if "single" in args.modes:
            ref["dense"] = row(kind, "1 GPU", "dense", model, inputs)
            rtlynx.sparsify(model, backend=args.backend)
            ref["rtlynx"] = row(kind, "1 GPU", "rtlynx", model, inputs)
            rtlynx.unsparsify(model)
        if "cp" in args.modes and run.world > 1:
            from diffusers import ContextParallelConfig

            model.enable_parallelism(config=ContextParallelConfig(**{f"{args.cp}_degree": run.world}))
            row(kind, cp_name, "dense", model, inputs, ref.get("dense"))
            rtlynx.sparsify(model, backend=args.backend)
            row(kind, cp_name, "rtlynx", model, inputs, ref.get("rtlynx"))
        if "tp" in args.modes and run.world > 1 and getattr(model, "_tp_plan", None):
            from diffusers import TensorParallelConfig

            del model
            gc.collect()
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
            model, inputs = build(kind, run, args.smoke, attention)
            model.enable_parallelism(config=TensorParallelConfig(tp_degree=run.world))
            tp_name = f"TP x{run.world}"
            row(kind, tp_name, "dense", model, inputs, ref.get("dense"))
            rtlynx.sparsify(model, backend=args.backend)  # on the sharded model (rtlynx.parallel)
            row(kind, tp_name, "rtlynx", model, inputs, ref.get("rtlynx"))
        del model
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        if run.rank == 0:
            print(f"  ({kind}: {time.time() - t0:.0f} s)", flush=True)
    if run.rank == 0:
        print(json.dumps(summarize(rows), indent=1))
        print(f"wrote {out}")
    if run.world > 1:
        dist.destroy_process_group()
    return 0


def summarize(rows: list[dict]) -> dict:
    """Per model and parallel mode: RT-Lynx's speed-up over dense, the 2-GPU scaling of each variant and the error
    check; the issue's goals (speed-up on 2 GPUs within 5% of the 1-GPU one; sparse CP efficiency >= 85%)."""
    by = {(r["model"], r["mode"], r["variant"]): r for r in rows}
    out = {}
    for kind in sorted({r["model"] for r in rows}):
        one = {v: by.get((kind, "1 GPU", v)) for v in ("dense", "rtlynx")}
        s = {}
        for mode in sorted({r["mode"] for r in rows if r["model"] == kind}):
            d, x = by.get((kind, mode, "dense")), by.get((kind, mode, "rtlynx"))
            m = {"speedup": d["ms"] / x["ms"] if d and x else None}
            if mode != "1 GPU":
                n = int(mode.split("x")[1].split()[0])
                for v, r in (("dense", d), ("rtlynx", x)):
                    if r and one[v]:
                        m[f"scaling_{v}"] = one[v]["ms"] / r["ms"]
                        m[f"efficiency_{v}"] = one[v]["ms"] / r["ms"] / n
                if d and x and "rel_err_vs_1gpu" in x:
                    m["rel_err_rtlynx"], m["rel_err_dense"] = x["rel_err_vs_1gpu"], d.get("rel_err_vs_1gpu")
                    m["ok"] = x["rel_err_vs_1gpu"] <= max(ERR_FLOOR, 2 * (d.get("rel_err_vs_1gpu") or 0))
                base = one["dense"]["ms"] / one["rtlynx"]["ms"] if one["dense"] and one["rtlynx"] else None
                if base and m["speedup"]:
                    m["goal_speedup_within_5pct"] = m["speedup"] >= 0.95 * base
                if mode.startswith("CP") and "efficiency_rtlynx" in m:
                    m["goal_cp_efficiency_85pct"] = m["efficiency_rtlynx"] >= 0.85
            s[mode] = m
        out[kind] = s
    return out


if __name__ == "__main__":
    raise SystemExit(main())
