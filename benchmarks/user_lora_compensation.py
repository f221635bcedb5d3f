"""Compensation fitted with the user's adapter on (issue 20 item 5; CPU is enough for paired metrics)

The shipped compensation LoRA was trained on the plain model; a strong style adapter moves the sampler elsewhere and
RT-Lynx + adapter lands far from dense + adapter (NOTES v13, v14, v21). Here the compensation is fitted again with the
adapter active, the way `rtlynx calibrate / train-lora --adapter FILE` do it:

- closed form: statistics of the dense + adapter sampler on the user's prompts, each layer's LoRA solved from them;
- global: every compensation LoRA trained jointly from the shipped one against dense + adapter on the states the
  sparse + adapter sampler reaches (rtlynx.distill_global; the adapter's own factors stay frozen).

Judged as in user_lora_quality.py: 16 held-out emoji names, 15 steps, the same noise, paired PSNR / SSIM of
RT-Lynx + adapter against dense + adapter (every step sparse and t < 0.2 dense), and of RT-Lynx against dense with
the adapter switched off (what a compensation fitted for one adapter costs the plain model).

    python benchmarks/user_lora_compensation.py [--global-steps 80 --cal 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peft import LoraConfig, set_peft_model_state_dict  # noqa: E402

from rtlynx import api, io  # noqa: E402
from rtlynx.benchtools import run_metadata  # noqa: E402
from rtlynx.demo import LORA_DIR  # noqa: E402
from rtlynx.distill import collect, fit_lora  # noqa: E402
from rtlynx.distill_global import GlobalConfig, train_global  # noqa: E402
from rtlynx.eval import fid as F  # noqa: E402
from rtlynx.models.miniflux import load_miniflux, to_uint8  # noqa: E402
from user_lora_quality import TARGETS, style_data, train_adapter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=".cache/emoji64.npz")
    ap.add_argument("--adapter-cache", default=".cache/user_style_adapter.safetensors")
    ap.add_argument("--n", type=int, default=16, help="held-out prompts")
    ap.add_argument("--steps", type=int, default=15, help="sampling steps of the evaluation")
    ap.add_argument("--cal", type=int, default=64, help="user prompts of the closed-form refit (0: skip)")
    ap.add_argument("--rank", type=int, default=8, help="closed-form refit rank (the shipped LoRA's)")
    ap.add_argument("--global-steps", type=int, default=80, help="global training steps under the adapter (0: skip)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rollout-prompts", type=int, default=16)
    ap.add_argument("--refresh", type=int, default=20)
    ap.add_argument("--sample-steps", type=int, default=10, help="sampling steps of the training rollouts")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--global-from", choices=("shipped", "closed"), default="shipped",
                    help="start the global training from the shipped LoRA or from the closed-form refit (then both "
                         "run in sequence on one model)")
    ap.add_argument("--fp8-control", action="store_true",
                    help="also dense FP8 (e4m3 operands, quality.py's emulation) against dense, with and without the "
                         "adapter: is the adapted sampler as hard on another perturbation of the same layers?")
    ap.add_argument("--device", default="cpu", help="cpu: fp32, reference path; cuda: bf16, the kernels (the adapter "
                                                    "itself is trained on the CPU, or read from --adapter-cache)")
    ap.add_argument("--out", default=str(RESULTS / "user_lora_compensation_cpu.json"))
    args = ap.parse_args(argv)
    meta = run_metadata()  # the commit that runs, not the one checked out when the (long) run ends
    torch.manual_seed(0)  # as user_lora_quality.py: the same adapter
    images, prompts, held = style_data(args.data, args.n)
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights=True)
    state, info = train_adapter(images, prompts, cfg, 150, 8, 1e-3, args.adapter_cache)
    user_prompts = sorted(set(prompts))

    def fresh():
        model = load_miniflux(device=args.device, dtype=torch.float32 if args.device == "cpu" else torch.bfloat16)
        io.load(model.transformer, LORA_DIR, dense_below_t=None)
        api.configure(model.transformer, backend="reference" if args.device == "cpu" else "auto", speed_rules=False)
        model.transformer.add_adapter(cfg, adapter_name="style")
        set_peft_model_state_dict(model.transformer, {k: v.to(args.device) for k, v in state.items()},
                                  adapter_name="style")
        return model

    model = fresh()
    t = model.transformer

    def sample(m=None):
        with torch.no_grad():
            return to_uint8((m or model).sample(held, num_steps=args.steps, seed=0)).cpu().numpy()

    with api.dense_mode(t):
        dense_a = sample()
    t.disable_adapters()
    with api.dense_mode(t):
        dense = sample()
    t.enable_adapters()

    def judge(m=None, full=False) -> dict:
        m = m or model
        tt = m.transformer
        row = {"every_step": F.paired_metrics(sample(m), dense_a)}
        if full:
            api.configure(tt, dense_below_t=0.2)
            row["t0.2"] = F.paired_metrics(sample(m), dense_a)
            api.configure(tt, dense_below_t=None)
            tt.disable_adapters()
            row["no_adapter_every_step"] = F.paired_metrics(sample(m), dense)
            tt.enable_adapters()
        print(json.dumps(row), flush=True)
        return row

    rows, t0 = {}, time.time()
    rows["shipped"] = judge(full=True)
    if args.fp8_control:
        from quality import _DenseFP8

        with api.dense_mode(t), _DenseFP8(t):
            row = {"every_step": F.paired_metrics(sample(), dense_a)}
            t.disable_adapters()
            row["no_adapter_every_step"] = F.paired_metrics(sample(), dense)
            t.enable_adapters()
        rows["dense_fp8_control"] = row
        print(json.dumps(row), flush=True)

    def closed_form(m):
        """the compensation refitted in closed form on dense + adapter statistics of ``args.cal`` user prompts"""
        cal = user_prompts[:: max(1, len(user_prompts) // args.cal)][: args.cal]
        t1 = time.time()
        stats = collect(m.transformer, lambda: m.sample(cal, num_steps=args.steps, seed=1))
        fit_lora(m.transformer, stats, rank=args.rank, progress=False)
        rows[f"closed_form_{len(cal)}"] = {**judge(m, full=True), "fit_s": round(time.time() - t1, 1)}
        return f"closed_form_{len(cal)}_then_"

    def global_(m, name):
        """every compensation LoRA trained jointly against dense + adapter on the sparse + adapter sampler's states"""
        gcfg = GlobalConfig(steps=args.global_steps, lr=args.lr, warmup=min(20, args.global_steps // 4),
                            batch=args.batch, calls_per_batch=8, rollout_prompts=args.rollout_prompts,
                            refresh=args.refresh, eval_every=args.eval_every, save_every=10 ** 6)
        t1 = time.time()
        rep = train_global(m.transformer, lambda ps, seed: m.sample(ps, num_steps=args.sample_steps, seed=seed),
                           user_prompts, gcfg, eval_fn=lambda step: {"psnr": judge(m)["every_step"]["psnr"]})
        rows[name] = {**judge(m, full=True), "train_s": round(time.time() - t1, 1), "timings": rep["timings"],
                      "curve": [h for h in rep["history"] if "psnr" in h]}

    if args.global_from == "closed":  # the two in sequence, as the shipped LoRA was made (closed form, then global)
        global_(model, closed_form(model) + f"global_{args.global_steps}")
    else:
        if args.global_steps:
            global_(model, f"global_{args.global_steps}")
        if args.cal:
            closed_form(fresh())
    out = {**meta, "model": "shipped mini-FLUX + shipped RT-Lynx LoRA (centred, global 500), "
           + ("fp32, reference path" if args.device == "cpu" else "bf16, backend auto"),
           "adapter": info, "n_held_out": len(held), "sampling_steps": args.steps, "args": vars(args),
           "judged_against": "dense + adapter (no_adapter_*: dense, the adapter off)", "rows": rows,
           "wall_s": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
