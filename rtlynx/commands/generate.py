"""`rtlynx generate`: images from a local FLUX / Qwen-Image / Z-Image pipeline (or the shipped mini-FLUX) with
RT-Lynx, optionally against dense (--compare: a table of seconds per image, median step time, speed-up and paired
PSNR; --compile: the transformer under torch.compile with CUDA graphs across the steps, both sides alike). Writes
PNGs and generate.json (settings + timings) into --out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..validate import arg_int, arg_real, arg_t
from . import help_of


DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str):
    import torch

    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


parse_t = arg_t  # --dense-below-t: a noise level in (0, 1], "none" or "config" (the old name)


def schedule_line(dense_below_t, flag, source: str) -> str:
    """The step schedule in use, where it came from and how to change it (one line)."""
    origin = f"from {source}" if flag == "config" else "from --dense-below-t"
    if dense_below_t:
        return (f"step schedule: sparse while the noise level t >= {dense_below_t}, dense below ({origin}; "
                "--dense-below-t none for every step sparse)")
    return f"step schedule: every step sparse ({origin}; --dense-below-t 0.2 runs the final steps dense)"


def hidden_alias(p, flag: str, dest: str, **kw) -> None:
    """An old option name kept for a release: same destination, absent from --help."""
    p.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def prepare(runner, lynx: str | None, preset: str | None, dense_below_t, backend: str, speed_rules: bool,
            sparse_dtype: str | None = None, keep_dense_weights: bool = False, dense_above_t="config") -> str:
    """Sparsify ``runner.transformer``: from a saved rtlynx directory (with its LoRA) or a preset (norm
    compensation only). Returns a short description. Raises ValueError / FileNotFoundError on bad input."""
    from .. import api, io

    if lynx and preset:
        raise ValueError("give --lynx (a saved sparsification) or --preset, not both")
    if lynx:
        io.load(runner.transformer, lynx, keep_dense_weights=keep_dense_weights)
        what = f"rtlynx save {lynx}"
    else:
        api.sparsify(runner.transformer, preset=preset or "auto")
        what = f"preset {preset or 'auto'} (norm compensation, no LoRA: distil one with calibrate + train-lora)"
    # --compare runs the dense baseline on the original weights: with FP8 sites they must stay next to the FP8 ones
    changes = {"backend": backend, "speed_rules": speed_rules, "keep_dense_weights": keep_dense_weights}
    if sparse_dtype is not None:
        changes["dtype"] = sparse_dtype
    for name, flag in (("dense_below_t", dense_below_t), ("dense_above_t", dense_above_t)):
        if flag != "config":
            changes[name] = None if flag == "none" else flag
    api.configure(runner.transformer, **changes)
    return what


def timed_sample(runner, prompts, args, dense: bool):
    """Images of ``prompts`` and one StepTimer per timed repetition (``--reps``, with --compare or --compile after an
    untimed warm-up: kernel selection, and with --compile the compiles and CUDA-graph recordings of every step)."""
    from .. import api
    from ..pipelines import StepTimer

    kw = dict(steps=args.steps, guidance=args.guidance, height=args.height, width=args.width, seed=args.seed)
    ctx = api.dense_mode(runner.transformer) if dense else _null()
    compiled = args.compile != "none"
    timers = []
    with ctx:
        if args.compare or compiled:  # compiled: every step, so both graphs of a step schedule are built here
            runner.sample(prompts[:1], **(kw if compiled else {**kw, "steps": 1}), latent=True)
        for _ in range(args.reps if args.compare else 1):
            with StepTimer(runner.called or runner.transformer) as timer:
                images = runner.sample(prompts, **kw)
            timers.append(timer)
    return images, timers


def timing(timers, images: int) -> dict:
    """Seconds per image (median over the repetitions) and the per-step times of the median repetition."""
    mid = sorted(timers, key=lambda t: t.total)[len(timers) // 2]
    return {"total_s": mid.total, "s_per_image": mid.total / images, "steps_s": mid.steps,
            "step_ms_median": 1e3 * _median(mid.steps), "reps": [t.total for t in timers]}


def _null():
    import contextlib

    return contextlib.nullcontext()


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def psnr(a, b) -> float:
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mse = float((d ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def run(args) -> int:
    from .. import api, validate
    from ..pipelines import ModelError, load_runner, model_kind

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise SystemExit("rtlynx generate: give --prompt (repeatable) or --prompts-file")
    out = Path(args.out)
    if (out / "generate.json").exists() and not args.overwrite:
        raise SystemExit(f"rtlynx generate: {out} already holds a generation; pass --overwrite or another --out")
    try:
        model_kind(args.model)
        device = validate.device("--device", args.device)
        runner = load_runner(args.model, device=device, dtype=torch_dtype(args.dtype))
        adapter = load_adapter(runner, args)
        what = prepare(runner, args.lynx, args.preset, args.dense_below_t, args.backend, not args.no_speed_rules,
                       args.sparse_dtype, keep_dense_weights=args.compare, dense_above_t=args.dense_above_t)
    except (ModelError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rtlynx generate: {e}") from None
    config = api.config_of(runner.transformer)
    print(f"{runner.kind} from {runner.path} on {runner.device} ({str(runner.dtype).removeprefix('torch.')}), "
          f"{len(api.sparse_layers(runner.transformer))} sparse layers: {what}")
    print(schedule_line(config.dense_below_t, args.dense_below_t, "the saved LoRA" if args.lynx else "the preset"))
    if args.lynx:
        from .. import io

        line = adapter_mismatch(io.provenance(args.lynx).get("adapter"), adapter)
        if line:
            print(line)
    if config.dense_above_t is not None:
        print(f"the first steps (noise level t > {config.dense_above_t}) run dense too (--dense-above-t none: off)")
    if args.compile != "none":
        runner.compile(regional=args.compile == "regional")
        print(f"compiled ({args.compile}, mode reduce-overhead: CUDA graphs on a GPU, one step mark per step)")
    images, timers = timed_sample(runner, prompts, args, dense=False)
    result = {"lynx": timing(timers, len(prompts)), "compile": args.compile}
    dense_images = None
    if args.compare:
        dense_images, dtimers = timed_sample(runner, prompts, args, dense=True)
        result["dense"] = timing(dtimers, len(prompts))
        result["speedup_median_step"] = result["dense"]["step_ms_median"] / result["lynx"]["step_ms_median"]
        result["speedup_total"] = result["dense"]["total_s"] / result["lynx"]["total_s"]
        result["psnr_vs_dense"] = [psnr(a, b) for a, b in zip(images, dense_images)]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(images):
        img.save(out / f"lynx_{i}.png")
        files.append(f"lynx_{i}.png")
        if dense_images is not None:
            dense_images[i].save(out / f"dense_{i}.png")
            files.append(f"dense_{i}.png")
    settings = {k: getattr(args, k) for k in ("model", "lynx", "preset", "steps", "guidance", "seed", "height",
                                              "width", "backend", "dtype", "compare", "compile", "reps")}
    settings.update(adapter=adapter, prompts=prompts, kind=runner.kind, device=str(runner.device),
                    torch_dtype=str(runner.dtype).removeprefix("torch."), sparsity=config.to_dict(),
                    sparse_layers=len(api.sparse_layers(runner.transformer)))
    (out / "generate.json").write_text(json.dumps({"settings": settings, "timing": result, "files": files}, indent=1))
    print(report(result))
    print(f"wrote {len(files)} PNG(s) and {out / 'generate.json'}")
    return 0


def report(result: dict) -> str:
    """The table of --compare (seconds per image, median step, ratio to dense, paired PSNR), or the times alone."""
    rows = [("dense", result.get("dense")), ("rtlynx", result["lynx"])]
    dense = result.get("dense")
    lines = [f"{'variant':8s} {'s/image':>8s} {'step ms':>8s} {'vs dense':>9s}  PSNR vs dense (paired)"]
    for name, r in rows:
        if r is None:
            continue
        ratio = "" if dense is None else f"{dense['s_per_image'] / r['s_per_image']:8.3f}x"
        psnrs = "-" if name == "dense" or "psnr_vs_dense" not in result else \
            ", ".join(f"{p:.2f} dB" for p in result["psnr_vs_dense"])
        lines.append(f"{name:8s} {r['s_per_image']:8.3f} {r['step_ms_median']:8.1f} {ratio:>9s}  {psnrs}")
    if "speedup_total" in result:
        lines.append(f"speed-up vs dense: {result['speedup_median_step']:.3f}x per step (median), "
                     f"{result['speedup_total']:.3f}x per image (text encoders and decoding included; "
                     f"median of {len(result['lynx']['reps'])} run(s))")
    return "\n".join(lines)


def read_prompts(path) -> list[str]:
    """Non-empty lines of a prompts file; SystemExit with one line if it is missing or empty."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = "it does not exist" if isinstance(e, FileNotFoundError) else e
        raise SystemExit(f"cannot read --prompts-file {p}: {reason}")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"prompts file {p} holds no prompts")
    return prompts


def add_model_args(p, steps_help="sampling steps (default: the pipeline's own)") -> None:
    """Options shared by generate / calibrate / select: the model and how to sample it."""
    p.add_argument("--model", default="miniflux",
                   help="local diffusers pipeline directory (FluxPipeline, QwenImagePipeline, ZImagePipeline) "
                        "or 'miniflux' for the shipped mini-FLUX (default: miniflux)")
    p.add_argument("--steps", type=arg_int(1), default=None, help=steps_help)
    p.add_argument("--guidance", type=arg_real(0), default=None,
                   help="guidance scale (Qwen-Image: true CFG scale) (default: the pipeline's own)")
    p.add_argument("--height", type=arg_int(16), default=None, help="image height (default: the pipeline's own)")
    p.add_argument("--width", type=arg_int(16), default=None, help="image width (default: the pipeline's own)")
    p.add_argument("--seed", type=arg_int(0), default=0, help="seed of the start noise (default: 0)")
    p.add_argument("--device", default="auto", help="cuda / cpu (default: auto = cuda if present)")
    p.add_argument("--dtype", default="auto", choices=tuple(DTYPES),
                   help="weights dtype (default: auto = bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--adapter", default=None, metavar="FILE|DIR",
                   help="your LoRA adapter (diffusers / PEFT .safetensors), active while this command samples: "
                        "calibrate / train-lora fit the compensation with it on (default: none)")
    p.add_argument("--adapter-scale", type=arg_real(0), default=1.0, help="the adapter's weight (default: 1.0)")


def load_adapter(runner, args) -> dict | None:
    """--adapter on ``runner`` before it is sparsified: its fingerprint, or None without one (ModelError if bad)."""
    from ..pipelines import ModelError

    if not getattr(args, "adapter", None):
        if getattr(args, "adapter_scale", 1.0) != 1.0:
            raise ModelError("--adapter-scale needs --adapter (the adapter file it scales)")
        return None
    fp = runner.load_adapter(args.adapter, args.adapter_scale)
    print(f"adapter {fp['file']} active at scale {fp['scale']:g}")
    return fp


def same_adapter(a: dict | None, b: dict | None) -> bool:
    """Two fingerprints of load_adapter (None: no adapter) name the same weights at the same scale."""
    return (a is None) == (b is None) and (a is None or (a["sha256"], a["scale"]) == (b["sha256"], b["scale"]))


def adapter_mismatch(fitted: dict | None, running: dict | None) -> str | None:
    """One line when a compensation fitted under one adapter (or none) runs under another, else None."""
    if same_adapter(fitted, running):
        return None
    return (f"warning: this compensation was fitted with {describe_adapter(fitted)}, and runs with "
            f"{describe_adapter(running)}: fit one for this adapter (rtlynx calibrate / train-lora --adapter) for the "
            "closest images")


def resume_adapter_error(where, had: dict | None, now: dict | None) -> str | None:
    """Why ``where``, made under the adapter ``had``, cannot be resumed under ``now`` (None: it can)."""
    if same_adapter(had, now):
        return None
    return f"{where} was made with {describe_adapter(had)}, not {describe_adapter(now)}; resume with the same adapter"


def describe_adapter(fp: dict | None) -> str:
    if fp is None:
        return "no adapter"
    return f"adapter {fp['file']} (sha256 {fp['sha256'][:12]}) at scale {fp['scale']:g}"


def add_centre_arg(p, help: str) -> None:
    """``--centre none|token_mean`` (SparsityConfig.centre; read it with :func:`centre_of`)."""
    p.add_argument("--centre", choices=("none", "token_mean"), default="none", help=help)


def centre_of(name: str):
    """--centre's value as SparsityConfig.centre ("none" -> None)."""
    return None if name == "none" else name


def register(sub) -> None:
    p = sub.add_parser("generate", help=help_of("generate"))
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line, added to --prompt (default: none)")
    p.add_argument("--lynx", default=None, help="rtlynx.save directory (from train-lora) to load (default: none)")
    p.add_argument("--preset", default=None,
                   help="layers to sparsify without --lynx: a preset name or a preset file from `rtlynx select` "
                        "(default: auto, by model class)")
    p.add_argument("--dense-below-t", type=arg_t, default="config", metavar="T|none|config",
                   help="run the final steps (noise level t < T) dense (default: config = the loaded value)")
    p.add_argument("--dense-above-t", type=arg_t, default="config", metavar="T|none|config",
                   help="run the first steps (noise level t > T) dense: with a strong style adapter they decide "
                        "the composition (default: config = the loaded value)")
    p.add_argument("--backend", default="auto", help="auto / reference / cusparselt / lynx (default: auto)")
    p.add_argument("--sparse-dtype", default=None, choices=("native", "fp8"),
                   help="operands of the sparse layers: fp8 = float8 e4m3 (FP8 sparse kernels on sm_90, else "
                        "emulated) (default: the saved / preset setting, native)")
    p.add_argument("--no-speed-rules", action="store_true",
                   help="sparse even where the kernels lose to dense (default: speed rules on)")
    p.add_argument("--compare", action="store_true",
                   help="also generate dense: a table of seconds per image, median step time, speed-up and paired "
                        "PSNR, after an untimed warm-up of each (default: off)")
    p.add_argument("--reps", type=arg_int(1), default=1,
                   help="with --compare: timed generations of each side, the median counts (default: 1)")
    p.add_argument("--compile", default="none", choices=("none", "full", "regional"),
                   help="torch.compile the transformer (mode reduce-overhead: CUDA graphs on a GPU, one step mark per "
                        "sampling step), whole or block by block (regional: faster to compile) (default: none)")
    p.add_argument("--out", default="rtlynx-generate", help="output directory (default: rtlynx-generate)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous generation in --out (default: off)")
    add_old_names(p)
    p.set_defaults(func=run)


def add_old_names(p, lynx: bool = True) -> None:
    """The option names of `rtlynx demo` in rtlynx 0.1 (--model-dir, --lora-dir), kept hidden for a release."""
    hidden_alias(p, "--model-dir", "model")
    if lynx:
        hidden_alias(p, "--lora-dir", "lynx")
