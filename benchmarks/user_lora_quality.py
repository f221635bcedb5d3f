"""Does a user's style adapter survive sparsification? (issue 20 item 5; CPU is enough for paired metrics)

Trains a small PEFT LoRA on the shipped mini-FLUX (dense, frozen base) that turns "noto style" prompts into the 3d
style: Emoji-64's 3d images with their prompts rewritten to "..., noto style". Then, on held-out emoji names (never in
the adapter's training set), the same noise for every variant:

- D dense, DA dense + adapter (``rtlynx.dense_mode``), S RT-Lynx (shipped LoRA, every step sparse), SA RT-Lynx + adapter,
  and S / SA with the step schedule (``dense_below_t=0.2``);
- paired PSNR / SSIM of SA vs DA against S vs D (the issue's goal: sparse + adapter as close to dense + adapter as sparse
  is to dense), the adapter's effect size (DA vs D), and how much of the adapter's change survives: the cosine between
  the pixel changes SA - S and DA - D, and |SA - S| / |DA - D|;
- SA again with the compensation LoRA refitted (closed form, rtlynx.distill) on the user's prompts, once without and
  once with the adapter active: does compensation calibrated under the adapter close the gap?

    python benchmarks/user_lora_quality.py [--steps-train 150 --n 16 --steps 15]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx

from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

from rtlynx import api, io  # noqa: E402
from rtlynx.benchtools import run_metadata  # noqa: E402
from rtlynx.data import emoji64  # noqa: E402
from rtlynx.demo import LORA_DIR  # noqa: E402
from rtlynx.distill import collect, fit_lora  # noqa: E402
from rtlynx.eval import fid as F  # noqa: E402
from rtlynx.models.miniflux import load_miniflux, to_uint8  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2"]


def style_data(path, held_out: int, seed: int = 0):
    """3d-style images with "noto style" prompts; the last ``held_out`` names (shuffled) are kept for evaluation."""
    d = emoji64.load(path)
    three_d = list(d["style_names"]).index("3d")
    idx = np.flatnonzero(d["style"] == three_d)
    rng = np.random.default_rng(seed)
    names = sorted({str(d["names"][i]) for i in idx})
    rng.shuffle(names)
    held = set(names[-held_out:])
    train = [i for i in idx if str(d["names"][i]) not in held]
    prompts = [str(d["prompts"][i]).replace("3d style", "noto style") for i in train]
    return d["images"][train], prompts, [f"{n}, noto style" for n in sorted(held)]


def train_adapter(images, prompts, cfg, steps: int, batch: int, lr: float, cache: str | None = None):
    """A PEFT adapter of ``cfg`` trained ``steps`` steps on the dense shipped mini-FLUX (base frozen): its state dict
    and a description. ``cache``: a safetensors file reused when it holds a run of the same settings."""
    from safetensors.torch import load_file, save_file

    key = {"rank": str(cfg.r), "steps": str(steps), "batch": str(batch), "lr": repr(lr), "images": str(len(images))}
    if cache and Path(cache).is_file():
        from safetensors import safe_open

        with safe_open(cache, "pt") as f:
            meta = f.metadata() or {}
        if all(meta.get(k) == v for k, v in key.items()):
            print(f"adapter from {cache} (trained earlier with the same settings)", flush=True)
            return load_file(cache), json.loads(meta["info"])
    model = load_miniflux()
    model.transformer.add_adapter(cfg, adapter_name="style")
    ids = model.tokenizer.encode(prompts)
    params = [p for n, p in model.transformer.named_parameters() if "lora_" in n]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0, losses = time.time(), []
    for step in range(steps):
        i = torch.randint(0, len(images), (batch,))
        x = torch.as_tensor(images[i.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1  # NHWC uint8 -> NCHW
        loss = model.loss(x, ids[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"adapter step {step}: loss {np.mean(losses[-25:]):.4f} ({time.time() - t0:.0f} s)", flush=True)
    state = {k: v.detach().clone().contiguous()
             for k, v in get_peft_model_state_dict(model.transformer, adapter_name="style").items()}
    info = {"task": "3d style for 'noto style' prompts", "rank": cfg.r, "targets": TARGETS, "train_steps": steps,
            "batch": batch, "lr": lr, "train_images": len(images), "train_s": round(time.time() - t0, 1),
            "final_loss": float(np.mean(losses[-25:]))}
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, cache, metadata={**key, "info": json.dumps(info)})
    return state, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=".cache/emoji64.npz")
    ap.add_argument("--steps-train", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--n", type=int, default=16, help="held-out prompts")
    ap.add_argument("--steps", type=int, default=15, help="sampling steps")
    ap.add_argument("--refit", type=int, default=16, help="user prompts to refit the compensation LoRA on (0: skip)")
    ap.add_argument("--out", default=str(RESULTS / "user_lora_quality_cpu.json"))
    ap.add_argument("--adapter-cache", default=None, help="safetensors file: reuse / keep the trained adapter")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    images, prompts, held = style_data(args.data, args.n)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights=True)

    # 1. the adapter, trained on the dense model
    state, info = train_adapter(images, prompts, cfg, args.steps_train, args.batch, args.lr, args.adapter_cache)

    # 2. the shipped RT-Lynx model, then the same adapter added to it (sparsify first, then add_adapter)
    model = load_miniflux()
    io.load(model.transformer, LORA_DIR, dense_below_t=None)
    api.configure(model.transformer, backend="reference", speed_rules=False)
    t = model.transformer

    def sample(noise=None):
        return to_uint8(model.sample(held, num_steps=args.steps, seed=0, noise=noise))

    # the seed-0 start noise (as model.sample draws it) and a copy nudged by 1e-3 of its scale: how chaotic is
    # each sampler on its own?
    n_tok, d_tok = model.grid ** 2, model.config["patch_size"] ** 2 * model.config["channels"]
    g = torch.Generator().manual_seed(0)
    noise0 = torch.randn(len(held), n_tok, d_tok, generator=g)
    nudged = noise0 + 1e-3 * torch.randn(noise0.shape, generator=torch.Generator().manual_seed(1))

    def first_steps_dense(above: float, below: float | None = None):
        """the steps with noise level t > ``above`` dense (the composition-deciding ones), and those below
        ``below`` if given; the rest sparse"""
        api.configure(t, dense_above_t=above, dense_below_t=below)
        try:
            return sample()
        finally:
            api.configure(t, dense_above_t=None, dense_below_t=None)

    def controls(d):
        """(dense with the nudged noise vs dense, sparse vs dense with the first steps dense)"""
        with api.dense_mode(t):
            dn = sample(nudged)
        return {"nudged_noise_dense": pm(dn, d), "first_dense_t0.8": pm(first_steps_dense(0.8), d),
                "first_dense_t0.6": pm(first_steps_dense(0.6), d),
                "first_dense_t0.8_final_t0.2": pm(first_steps_dense(0.8, 0.2), d),
                "first_dense_t0.6_final_t0.2": pm(first_steps_dense(0.6, 0.2), d)}

    def pm(a, b):
        return F.paired_metrics(a.numpy(), b.numpy())

    def three():
        """dense, sparse every step, sparse with t < 0.2 dense: the same noise"""
        with api.dense_mode(t):
            d = sample()
        s_ = sample()
        api.configure(t, dense_below_t=0.2)
        st = sample()
        api.configure(t, dense_below_t=None)
        return d, s_, st

    with torch.no_grad():
        dense, sparse, sparse_t = three()
        ctl = controls(dense)
        t.add_adapter(cfg, adapter_name="style")
        set_peft_model_state_dict(t, state, adapter_name="style")
        dense_a, sparse_a, sparse_a_t = three()
        ctl_a = controls(dense_a)
    for name, c in (("without adapter", ctl), ("with adapter", ctl_a)):
        print(name, " | ".join(f"{k} PSNR {v['psnr']:.2f} dB SSIM {v['ssim']:.3f}" for k, v in c.items()), flush=True)
    refit = {}
    if args.refit:  # the compensation LoRA refitted on the user's prompts, without and with the adapter active
        cal = prompts[:: max(1, len(prompts) // args.refit)][: args.refit]
        for name, active in (("without adapter", False), ("with adapter", True)):
            (t.enable_adapters if active else t.disable_adapters)()
            stats = collect(t, lambda: model.sample(cal, num_steps=args.steps, seed=1))
            t.enable_adapters()
            fit_lora(t, stats, rank=8, progress=False)
            with torch.no_grad():
                refit[name] = pm(sample(), dense_a)
            print(f"compensation refitted on {len(cal)} user prompts {name}: sparse + adapter vs dense + adapter "
                  f"PSNR {refit[name]['psnr']:.2f} dB  SSIM {refit[name]['ssim']:.3f}", flush=True)

    da, sa = dense_a.double() - dense.double(), sparse_a.double() - sparse.double()
    out = {**run_metadata(), "model": "shipped mini-FLUX + shipped RT-Lynx LoRA, reference path",
           "adapter": info,
           "n_held_out": len(held), "sampling_steps": args.steps,
           "sparse_vs_dense": pm(sparse, dense), "sparse_adapter_vs_dense_adapter": pm(sparse_a, dense_a),
           "sparse_t0.2_vs_dense": pm(sparse_t, dense), "sparse_adapter_t0.2_vs_dense_adapter": pm(sparse_a_t, dense_a),
           "adapter_effect_dense": pm(dense_a, dense), "adapter_effect_sparse": pm(sparse_a, sparse),
           "adapter_change_cosine": float((da * sa).sum() / (da.norm() * sa.norm())),
           "adapter_change_ratio": float(sa.norm() / da.norm()),
           "refit_compensation_sparse_adapter_vs_dense_adapter": refit,
           # controls: the dense sampler's own sensitivity (start noise nudged by 1e-3 of its scale, vs the same
           # model's un-nudged images) and RT-Lynx with the first, composition-deciding steps dense (vs dense),
           # without and with the adapter
           "controls_without_adapter": ctl, "controls_with_adapter": ctl_a}
    for k in ("sparse_vs_dense", "sparse_adapter_vs_dense_adapter", "sparse_t0.2_vs_dense",
              "sparse_adapter_t0.2_vs_dense_adapter", "adapter_effect_dense", "adapter_effect_sparse"):
        print(f"{k:34s} PSNR {out[k]['psnr']:.2f} dB  SSIM {out[k]['ssim']:.3f}")
    print(f"adapter change kept under sparsity: cosine {out['adapter_change_cosine']:.3f}, "
          f"norm ratio {out['adapter_change_ratio']:.3f}")
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
