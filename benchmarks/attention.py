"""Attention backends at the attention shapes of FLUX.1-dev, Qwen-Image and Z-Image at 1024x1024 (issue 19 item 1):
TFLOPS of every backend that runs here, in one run, and its error against exact attention on the same inputs.

    python benchmarks/attention.py [--reps 30] [--backends native _native_cudnn ...] [--out FILE]
    python benchmarks/attention.py --smoke           # the CPU path: tiny shapes, the CPU backends

Backends are called through diffusers' dispatcher (``dispatch_attention_fn(..., backend=name)``: what
``set_attention_backend`` / ``attention_backend`` make a model call), one row each, or skipped with the reason
(not installed, wrong device, an error on the first call):
- native: torch SDPA, torch's own choice (today's reference); _native_cudnn / _native_flash / _native_efficient: SDPA
  forced to one kernel; flex: torch flex_attention, under torch.compile (uncompiled it materialises the scores).
- flash (flash-attn 2), _flash_3 (FlashAttention-3, flash_attn_interface), sage (SageAttention >= 2.1.1),
  _sage_qk_int8_pv_fp8_cuda_sm90 (SageAttention 2's INT8-QK / FP8-PV sm90 kernel), xformers.
- "sageattention (direct)": sageattention.sageattn of the installed package, called directly: 1.0.6 (Triton only,
  INT8 QK) installs from the package index but is below the 2.1.1 diffusers' "sage" backend wants.
FA3 with FP8 inputs and FlashAttention 4 are not on the package index as wheels for this torch; their rows say so.

Shapes: batch 1, heads x head dim of the diffusers classes' defaults, sequence = image + text tokens as the models run
at 1024x1024 (the M of the attention projections in ../shared/gemm_shapes/target_models.csv; tests check both):
FLUX.1-dev 24 x 128, 4096 + 512 (57 attention calls a forward); Qwen-Image 24 x 128, 4096 + 128 (60); Z-Image
30 x 128, 4096 + 128 (30, plus 2 refiner layers at 4096 not counted). FLOPs 4 * B * H * S^2 * D (QK^T and PV).
Each backend: median of --reps calls after warm-up, Q/K/V sets rotated beyond L2 (rtlynx.benchtools.measure), bf16
in and out; error: relative Frobenius error against fp32 exact attention of the first set. Ratios: native's time /
the backend's time, same shape, same run. Results: benchmarks/results/attention_<device>.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import time
from pathlib import Path

import torch

from rtlynx.benchtools import fmt, geomean, input_sets, measure, run_metadata

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (class defaults: heads, head_dim; sequence: image + text tokens; attention calls per forward)
SHAPES = {
    "flux": {"model": "FLUX.1-dev", "heads": 24, "head_dim": 128, "seq": 4096 + 512, "calls": 19 + 38},
    "qwen-image": {"model": "Qwen-Image", "heads": 24, "head_dim": 128, "seq": 4096 + 128, "calls": 60},
    "z-image": {"model": "Z-Image", "heads": 30, "head_dim": 128, "seq": 4096 + 128, "calls": 30},
}
SMOKE_SHAPES = {"tiny": {"model": "tiny", "heads": 2, "head_dim": 32, "seq": 96, "calls": 4}}
BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flex", "flash", "_flash_3", "sage",
            "_sage_qk_int8_pv_fp8_cuda_sm90", "xformers", "sageattention (direct)")
CPU_BACKENDS = ("native", "_native_math", "_native_flash")
NOT_ON_INDEX = {"_flash_3 fp8": "FA3 with FP8 inputs: no wheel on the package index for this torch (a source build)",
                "flash-attn-4": "FlashAttention 4 (CuTeDSL): its wheel needs nvidia-cutlass-dsl, over the carry limit"}
PACKAGES = ("torch", "diffusers", "flash-attn", "flash_attn_3", "sageattention", "xformers", "triton")


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def backend_fn(name: str):
    """A callable (q, k, v) -> out in diffusers' [B, S, H, D] layout, or a string: why it cannot run here."""
    from diffusers.models import attention_dispatch as ad

    if name == "sageattention (direct)":
        try:
            from sageattention import sageattn
        except ImportError as e:
            return f"sageattention not installed ({e})"
        return lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    try:
        key = ad.AttentionBackendName(name)
        ad._check_attention_backend_requirements(key)
    except (ValueError, RuntimeError, ImportError) as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"

    def call(q, k, v):
        return ad.dispatch_attention_fn(q, k, v, backend=key)

    if name == "flex":
        return torch.compile(call, dynamic=False)  # flex_attention's fused kernel exists only compiled
    return call


def exact(q, k, v) -> torch.Tensor:
    """fp32 attention, [B, S, H, D] in and out."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ v).transpose(1, 2)


def run_shape(key: str, shape: dict, names, reps: int, device: str, dtype) -> list[dict]:
    b, s, h, d = 1, shape["seq"], shape["heads"], shape["head_dim"]
    flop = 4 * b * h * s * s * d
    nbytes = 3 * b * s * h * d * torch.finfo(dtype).bits // 8

    def make_inputs():
        return tuple(torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))

    sets = [make_inputs() for _ in range(input_sets(nbytes))]
    ref = exact(*sets[0])
    rows = []
    for name in names:
        row = {"shape": key, "model": shape["model"], "backend": name, "B": b, "S": s, "H": h, "D": d}
        fn = backend_fn(name)
        if isinstance(fn, str):
            row["skipped"] = fn
            rows.append(row)
            continue
        t0 = time.time()
        try:
            with torch.no_grad():
                out = fn(*sets[0])
                row["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
                t = measure([lambda qkv=qkv: fn(*qkv) for qkv in sets], reps=reps, warmup=max(3, len(sets)),
                            flush_l2=False)
            row.update(ms=t.median_ms, tflops=flop / t.median_ms / 1e9, input_sets=t.input_sets,
                       ms_per_forward=t.median_ms * shape["calls"], first_call_s=round(time.time() - t0, 1))
        except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others
            row["skipped"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        rows.append(row)
    native = next((r for r in rows if r["backend"] == "native" and "ms" in r), None)
    for r in rows:
        if native and "ms" in r:
            r["vs_native"] = native["ms"] / r["ms"]
    return rows


def summarize(rows: list[dict]) -> dict:
    """Fastest backend per model (and its error), and each backend's geomean ratio to native over the models."""
    out = {"fastest": {}, "vs_native_geomean": {}}
    for key in dict.fromkeys(r["shape"] for r in rows):
        timed = [r for r in rows if r["shape"] == key and "ms" in r]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            out["fastest"][key] = {"backend": best["backend"], "tflops": best["tflops"], "rel_err": best["rel_err"]}
    for name in dict.fromkeys(r["backend"] for r in rows):
        out["vs_native_geomean"][name] = geomean([r.get("vs_native") for r in rows if r["backend"] == name])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30, help="timed calls per backend and shape (median)")
    ap.add_argument("--backends", nargs="+", default=None, help=f"default: all ({', '.join(BACKENDS)})")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", default=None, help="results JSON (default: results/attention_<device>.json)")
    ap.add_argument("--smoke", action="store_true", help="the CPU path: a tiny shape, the CPU backends, 3 reps")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype, shapes, names, reps = "cpu", torch.float32, SMOKE_SHAPES, args.backends or CPU_BACKENDS, 3
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU (--smoke checks the script on a CPU)")
    else:
        device, dtype, reps = "cuda", torch.bfloat16, args.reps
        shapes, names = {k: SHAPES[k] for k in args.shapes}, args.backends or BACKENDS
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    out = Path(args.out or RESULTS / f"attention_{gpu.replace(' ', '_')}.json")
    doc = {**run_metadata(), "device": gpu, "versions": versions(), "dtype": str(dtype).removeprefix("torch."),
           "not_measured": NOT_ON_INDEX, "rows": []}
    print(f"{gpu}: median of {reps} calls, TFLOPS = 4 B H S^2 D / time")
    print(f"{'model':11s} {'backend':32s} {'ms':>8s} {'TFLOPS':>7s} {'vs native':>9s} {'rel err':>8s}")
    for key, shape in shapes.items():
        for r in run_shape(key, shape, names, reps, device, dtype):
            doc["rows"].append(r)
            doc["summary"] = summarize(doc["rows"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1))  # row by row: a call cut short keeps what it measured
            if "ms" in r:
                print(f"{r['model']:11s} {r['backend']:32s} {r['ms']:8.3f} {r['tflops']:7.1f} "
                      f"{fmt(r.get('vs_native')):>8s}x {r['rel_err']:8.1e}", flush=True)
            else:
                print(f"{r['model']:11s} {r['backend']:32s} skipped: {r['skipped']}", flush=True)
    print(json.dumps(doc.get("summary", {}), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
