"""Global distillation of the mini-FLUX compensation LoRA (issue 18) and one FLUX.1-dev optimisation step.

    python benchmarks/distill_global.py train --prompts-file P --out DIR [--steps N ...]
        from the shipped closed-form LoRA, every step sparse: learning curves (held-out velocity error on dense
        and on student states, paired PSNR vs dense on held-out prompts) -> DIR (an rtlynx save + curves).
    python benchmarks/distill_global.py summarize --every Q.json --t02 Q2.json --curves C.json --out OUT.json
        the issue's summary keys from quality.py runs of the new LoRA.
    python benchmarks/distill_global.py flux-step --out results/distill_flux_step.json
        one measured optimisation step of FLUX.1-dev (random weights, real configuration) at 1024x1024.

Training prompts are the prompts that the FID protocol (rtlynx.eval.fid.fid_prompts, n=5000, seed 0) never
draws; the held-out prompts are drawn from the FID set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx

from rtlynx import api, io  # noqa: E402
from rtlynx.benchtools import run_metadata  # noqa: E402
from rtlynx.demo import LORA_DIR  # noqa: E402
from rtlynx.distill_global import GlobalConfig, grow_lora_rank, train_global  # noqa: E402
from rtlynx.eval import fid as F  # noqa: E402
from rtlynx.models.miniflux import load_miniflux, to_uint8  # noqa: E402
from rtlynx.recording import record_round, velocity_error  # noqa: E402
from rtlynx.validate import arg_rank_or_fill  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def split_prompts(all_prompts: list[str], n_fid: int = 5000, seed: int = 0):
    fid = F.fid_prompts(all_prompts, n_fid, seed)
    held = set(fid)
    train = sorted({p for p in all_prompts if p not in held})
    val = list(dict.fromkeys(fid))  # unique, in draw order
    return train, val


def cmd_train(args) -> int:
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = load_miniflux(args.model_dir, device=dev, dtype=dtype)
    io.load(model.transformer, args.init, dense_below_t=None)
    if args.grow_rank:  # (a resumed run grows the same way: its checkpoint holds the grown factors)
        print(f"LoRA rank grown to {args.grow_rank} on {grow_lora_rank(model.transformer, args.grow_rank, args.seed)} "
              "layers (new B columns zero: the closed form's output to start)")
    api.configure(model.transformer, backend=args.backend, speed_rules=False)
    all_prompts = Path(args.prompts_file).read_text().splitlines()
    train, val = split_prompts(all_prompts)
    print(f"{len(train)} training prompts (never drawn by the FID protocol), {len(val)} held-out")
    steps = args.sample_steps
    roll = lambda p, s: model.sample(p, num_steps=steps, seed=s)  # noqa: E731
    val_p = val[: args.val_prompts]
    t0 = time.time()
    val_dense = record_round(model.transformer, roll, val_p[:16], 777, "dense")
    val_student = record_round(model.transformer, roll, val_p[:16], 777, "student")
    with api.dense_mode(model.transformer):
        ref = to_uint8(model.sample(val_p, num_steps=steps, seed=0))
    print(f"held-out sets in {time.time() - t0:.1f} s")

    def eval_fn(step):
        img = to_uint8(model.sample(val_p, num_steps=steps, seed=0))
        return {"val_student_rel_err": velocity_error(model.transformer, val_student),
                "psnr_vs_dense": float(F.psnr(img, ref).mean())}

    cfg = GlobalConfig(steps=args.steps, lr=args.lr, batch=args.batch, calls_per_batch=args.calls_per_batch,
                       rollout_prompts=args.rollout_prompts, refresh=args.refresh, buffer_rounds=args.buffer_rounds,
                       states=args.states, t_weight=args.t_weight, eval_every=args.eval_every,
                       target=args.target, endpoint_weight=args.endpoint_weight,
                       save_every=args.eval_every, seed=args.seed, checkpointing=args.checkpointing,
                       dense_below_t=args.save_dense_below_t if args.train_for_schedule else None)
    t0 = time.time()
    with _sdpa(args.sdpa):
        rep = train_global(model.transformer, roll, train, cfg, val_calls=val_dense, eval_fn=eval_fn,
                           checkpoint=Path(args.out) / "checkpoint", resume=args.resume)
    gpu_min = (time.time() - t0) / 60
    api.configure(model.transformer, dense_below_t=args.save_dense_below_t)
    io.save(model.transformer, args.out, overwrite=True)
    rank = max(layer.lora_rank for layer in api.sparse_layers(model.transformer).values())
    report = {**run_metadata(), "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
              "objective": "global", "init": str(args.init), "rank": rank, "sample_steps": steps,
              "train_prompts": len(train), "val_prompts": len(val_p), "gpu_minutes": gpu_min, **rep}
    (Path(args.out) / "distill_report.json").write_text(json.dumps(report, indent=1))
    plot_curves(report["history"], Path(args.out) / "curves.png")
    print(f"wrote {args.out} ({gpu_min:.1f} min)")
    return 0


def _sdpa(name: str):
    """One SDPA backend for the whole run (``auto``: torch's own choice), to tell a backend's bug from ours."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                         "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]])


def plot_curves(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in history if "val_rel_err" in r]
    tr = [r for r in history if "train_rel_err" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([r["step"] for r in tr], [r["train_rel_err"] for r in tr], lw=0.5, alpha=0.5, label="train batch")
    ax[0].plot([r["step"] for r in ev], [r["val_rel_err"] for r in ev], "o-", label="held-out, dense states")
    if ev and "val_student_rel_err" in ev[0]:
        ax[0].plot([r["step"] for r in ev], [r["val_student_rel_err"] for r in ev], "s-",
                   label="held-out, student states (fixed)")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("optimisation step")
    ax[0].set_ylabel("relative velocity error")
    ax[0].legend(fontsize=8)
    if ev and "psnr_vs_dense" in ev[0]:
        ax[1].plot([r["step"] for r in ev], [r["psnr_vs_dense"] for r in ev], "o-")
        ax[1].set_xlabel("optimisation step")
        ax[1].set_ylabel("paired PSNR vs dense (dB)")
    fig.suptitle("mini-FLUX global distillation (every step sparse)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _merge_runs(runs: list[dict]) -> dict:
    """quality.py outputs of one protocol (same card, images, steps, seed; e.g. the dense row of one call and the
    RT-Lynx row of the next on the same warm machine) as one run; anything else is refused."""
    keys = ("device", "n_generated", "steps", "seed", "guidance_scale")
    for r in runs[1:]:
        diff = [k for k in keys if k in r and k in runs[0] and r[k] != runs[0][k]]
        if diff:
            raise SystemExit(f"summarize: the runs differ in {', '.join(diff)}: not one protocol")
    out = dict(runs[-1] if "commit" in runs[-1] else runs[0])
    out["variants"] = {k: v for r in runs for k, v in r["variants"].items()}
    out["parts"] = [{k: r.get(k) for k in ("commit", "backend", "lora", "seconds_total", "partial")} | {"variants": list(r["variants"])} for r in runs]
    return out


def cmd_summarize(args) -> int:
    every = _merge_runs([json.loads(Path(f).read_text()) for f in args.every])
    t02 = json.loads(Path(args.t02).read_text()) if args.t02 else None
    v = every["variants"]
    dense = v["dense"]["fid"]
    s = {"fid_every_step_over_dense": v["rtlynx"]["fid"] / dense}
    if "act24" in v:
        s["gap_closed_every_step"] = (v["act24"]["fid"] - v["rtlynx"]["fid"]) / (v["act24"]["fid"] - dense)
    fp8 = json.loads(Path(args.fp8).read_text())["variants"] if args.fp8 else v  # same card, seed and prompts
    if "rtlynx_fp8" in fp8:
        s["fid_fp8_over_bf16"] = fp8["rtlynx_fp8"]["fid"] / v["rtlynx"]["fid"]
    if t02 is not None:
        s["fid_t0.2_over_dense"] = t02["variants"]["rtlynx"]["fid"] / t02["variants"]["dense"]["fid"]
    elif "rtlynx_t0.2" in v:  # the schedule as a variant of the same run
        s["fid_t0.2_over_dense"] = v["rtlynx_t0.2"]["fid"] / dense
    if "rtlynx_fp8_t0.2" in v and "rtlynx_t0.2" in v:
        s["fid_fp8_over_bf16_t0.2"] = v["rtlynx_fp8_t0.2"]["fid"] / v["rtlynx_t0.2"]["fid"]
    closed = json.loads(Path(args.closed_form).read_text()) if args.closed_form else None
    if closed is not None:
        s["closed_form_fid_every_step_over_dense"] = closed["summary"]["rtlynx_fid_over_dense"]
        if "act24" not in v and "act24" in closed["variants"]:  # naive 2:4 of another run: said so in the key
            naive = closed["variants"]["act24"]["fid"]
            s["gap_closed_every_step_cross_run"] = (naive - v["rtlynx"]["fid"]) / (naive - dense)
    curves = json.loads(Path(args.curves).read_text()) if args.curves else None
    out = {**run_metadata(), "device": every["device"], "every_step": every, "t0.2": t02,
           "fp8": json.loads(Path(args.fp8).read_text()) if args.fp8 else None,
           "distill": {k: curves[k] for k in ("gpu_minutes", "config", "timings", "lora_params", "rank")
                       if curves and k in curves} if curves else None,
           "summary": s}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(s, indent=1))
    return 0


def cmd_compare(args) -> int:
    """Paired PSNR / SSIM against dense and grain (mean |Laplacian| of the luma, relative to dense; fid_ablation.py's
    measure, which tracks FID there) of several LoRAs on the same held-out prompts, seeds and noise: a check that runs
    on a CPU in minutes, where FID needs a GPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fid_ablation import grain

    dev = args.device
    model = load_miniflux(args.model_dir, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    _, val = split_prompts(Path(args.prompts_file).read_text().splitlines())
    prompts = val[: args.n]
    rows = {}
    dense = None
    for spec in ["dense", *args.lora]:
        path, _, t = spec.partition("@")
        if path != "dense":
            io.load(model.transformer, path, dense_below_t=float(t) if t else None)
            api.configure(model.transformer, backend="reference", speed_rules=False)
        t0 = time.time()
        ctx = api.dense_mode(model.transformer) if path == "dense" else contextlib.nullcontext()
        with ctx:
            img = to_uint8(model.sample(prompts, num_steps=args.sample_steps, seed=args.seed)).numpy()
        if path == "dense":
            dense = img
            rows[spec] = {"grain_rel": 1.0, "seconds": time.time() - t0}
        else:
            rows[spec] = {**F.paired_metrics(img, dense), "grain_rel": grain(img) / grain(dense),
                          "seconds": time.time() - t0}
            api.unsparsify(model.transformer)
        print(spec, json.dumps(rows[spec]), flush=True)
    out = {**run_metadata(), "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
           "n": len(prompts), "sample_steps": args.sample_steps, "seed": args.seed, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def cmd_flux_step(args) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from e2e import MODELS, build

    from rtlynx.integrations.diffusers import example_inputs

    dev = "cuda"
    model = build("flux", dev)
    inputs = example_inputs(model, batch=1, text_len=512, **MODELS["flux"][2])
    inputs["guidance"] = torch.full((1,), 3.5, device=dev)
    rtlynx_kw = dict(lora_rank=args.rank)
    import rtlynx

    rtlynx.sparsify(model, **rtlynx_kw)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    roll = lambda p, s: model(**inputs)  # noqa: E731  (one transformer call stands for a sampler)
    cfg = GlobalConfig(steps=args.steps, batch=1, calls_per_batch=1, rollout_prompts=1, refresh=10 ** 6,
                       eval_every=10 ** 6, save_every=10 ** 6, warmup=0)
    rep = train_global(model, roll, ["x"], cfg, store_device="cpu")
    times = [r["step_s"] for r in rep["history"] if "step_s" in r]
    out = {**run_metadata(), "device": torch.cuda.get_device_name(0), "model": "FLUX.1-dev (random weights)",
           "resolution": "1024x1024 (4096 image + 512 text tokens)", "lora_rank": args.rank,
           "lora_params": rep["lora_params"], "gradient_checkpointing": True,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
           "s_per_step": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0],
           "step_s_all": times, "rollout_s": rep["timings"]["rollout_s"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("device", "peak_gib", "s_per_step", "lora_params")}, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--prompts-file", required=True)
    t.add_argument("--model-dir", default=str(Path(__file__).resolve().parents[1] / "rtlynx/assets/miniflux"))
    t.add_argument("--init", default=str(LORA_DIR), help="LoRA to start from (default: the shipped one)")
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="cuda")
    t.add_argument("--backend", default="reference", help="backend of rollouts / evaluations (training: reference)")
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--calls-per-batch", type=int, default=16)
    t.add_argument("--rollout-prompts", type=int, default=128)
    t.add_argument("--refresh", type=int, default=50)
    t.add_argument("--buffer-rounds", type=int, default=3)
    t.add_argument("--states", choices=["student", "dense"], default="student")
    t.add_argument("--t-weight", choices=["uniform", "late", "early"], default="uniform")
    t.add_argument("--target", choices=["velocity", "endpoint"], default="velocity")
    t.add_argument("--endpoint-weight", type=float, default=1.0)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--val-prompts", type=int, default=64)
    t.add_argument("--sample-steps", type=int, default=30)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing per block (not needed on the mini-FLUX)")
    t.add_argument("--sdpa", choices=["auto", "flash", "efficient", "cudnn", "math"], default="auto",
                   help="the attention backend of the whole run (auto: torch's choice)")
    t.add_argument("--save-dense-below-t", type=float, default=0.2, help="the step schedule saved with the LoRA")
    t.add_argument("--train-for-schedule", action="store_true",
                   help="train for that schedule: rollouts and evaluations run it, its dense steps leave the loss")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--grow-rank", type=arg_rank_or_fill(1), default=0,
                   help="grow every LoRA of --init to this rank first (zero new B columns: same output), e.g. 16, "
                        "or 'fill' (each site to 64 // members: what rank 8 costs)")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("summarize")
    s.add_argument("--every", required=True, nargs="+", help="quality.py outputs of one protocol, merged")
    s.add_argument("--t02", default=None)
    s.add_argument("--fp8", default=None, help="a quality.py run of rtlynx_fp8 alone (else --every's)")
    s.add_argument("--closed-form", default=str(RESULTS / "quality.json"))
    s.add_argument("--curves", default=None, help="the distill_report.json of the trained LoRA")
    s.add_argument("--out", default=str(RESULTS / "quality_global.json"))
    s.set_defaults(func=cmd_summarize)
    c = sub.add_parser("compare", help="paired PSNR / SSIM / grain of LoRAs vs dense (DIR or DIR@T for dense below T)")
    c.add_argument("--prompts-file", required=True)
    c.add_argument("--model-dir", default=str(Path(__file__).resolve().parents[1] / "rtlynx/assets/miniflux"))
    c.add_argument("--lora", nargs="+", required=True)
    c.add_argument("--n", type=int, default=64)
    c.add_argument("--sample-steps", type=int, default=30)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_compare)
    f = sub.add_parser("flux-step")
    f.add_argument("--out", default=str(RESULTS / "distill_flux_step.json"))
    f.add_argument("--rank", type=int, default=32)
    f.add_argument("--steps", type=int, default=4)
    f.set_defaults(func=cmd_flux_step)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
