"""Train the dense MiniFlux reference model on Emoji-64 (rectified flow, as FLUX).

Budget is wall time: `minutes` is the whole run's training time (across resumes) and drives the lr
schedule (linear warmup, cosine to `min_lr_frac` at the end); `session_minutes` caps one invocation, so a
10-minute GPU call can do part of the run and a later `--resume` continues the same schedule.

Out dir: ckpt.pt (full fp32 state + optimizer, for exact resume), ema/ (EMA weights via
MiniFlux.save_pretrained, fp16 shards; `--init` resumes from these when ckpt.pt could not travel),
loss.json (history), samples.png.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rtlynx.data import emoji64
from rtlynx.models.miniflux import MiniFlux, WordTokenizer, image_grid, to_uint8

# Prompts for the sample sheet: common, visually distinct emoji in the three styles.
SHEET_NAMES = ["grinning face", "red heart", "fire", "thumbs up", "dog face", "pizza", "rocket", "sun",
               "face with tears of joy", "smiling face with heart-eyes", "ghost", "cat face",
               "red apple", "rainbow", "soccer ball", "flag japan"]


@dataclass
class TrainConfig:
    data: str = str(emoji64.DEFAULT_PATH)
    out: str = "outputs/miniflux"
    minutes: float = 15.0  # whole-run training budget (sets the lr schedule)
    session_minutes: float | None = None  # stop this invocation earlier (resume later)
    max_steps: int | None = None  # for tests
    batch_size: int = 512
    lr: float = 8e-4
    warmup_steps: int = 300
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # classifier-free guidance: prompt dropped to the null prompt
    t_mean: float = 0.0
    t_std: float = 1.0
    balance: bool = True  # identity-balanced sampling
    compile: bool = False
    bf16: bool = True  # autocast on CUDA
    seed: int = 0
    ckpt_minutes: float = 2.0
    log_every: int = 50
    model: dict = field(default_factory=dict)  # MiniFlux config overrides


def _lr(cfg: TrainConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cos = cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warm * cos


def load_data(path, device):
    d = emoji64.load(path)
    images = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).contiguous().to(device)  # uint8 [N,3,64,64]
    return d, images


def sample_sheet(model: MiniFlux, path, names=SHEET_NAMES, styles=("noto", "twemoji", "3d"),
                 guidance_scale=None, num_steps=None, seed=0):
    """One row per style, one column per name; returns the PIL image (also saved to path)."""
    prompts = [f"{n}, {emoji64.STYLE_PHRASES[s]}" for s in styles for n in names]
    imgs = model.sample(prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed)
    grid = image_grid(to_uint8(imgs).numpy(), nrow=len(styles))
    if path:
        grid.save(path)
    return grid


def checkpoint_payload(model, ema, opt, state: dict, tok, cfg: TrainConfig) -> dict:
    """What ckpt.pt holds: tensors, numbers, strings, lists and dicts only (so it loads with weights_only=True)."""
    return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "state": state,
            "model_config": dict(model.config), "tokenizer": tok.to_json(), "train_config": asdict(cfg)}


def load_checkpoint(path) -> dict:
    """ckpt.pt with ``weights_only=True``: a checkpoint is data; unpickling arbitrary objects would run code from
    whoever wrote the file (checkpoints travel between machines)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train(cfg: TrainConfig, resume: bool = False, init: str | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN SDPA backward fails on this model (H100/H200)
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    d, images = load_data(cfg.data, dev)
    ckpt_path = out / "ckpt.pt"
    state = {"step": 0, "elapsed_s": 0.0, "samples": 0, "history": []}
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        tok = WordTokenizer.from_json(ck["tokenizer"])
        model = MiniFlux(ck["model_config"], tok)
        model.load_state_dict(ck["model"])
        state = ck["state"]
        print(f"resumed {ckpt_path} at step {state['step']}, {state['elapsed_s'] / 60:.2f} min")
    elif init:
        model = MiniFlux.from_pretrained(init)  # EMA weights only: optimizer state starts fresh
        tok = model.tokenizer
        hist = Path(init) / "loss.json"
        state.update(json.loads((Path(init) / "config.json").read_text()).get("train_state", {}))
        if hist.exists():
            state["history"] = json.loads(hist.read_text())["history"]
        print(f"initialised from EMA weights {init} at step {state['step']} (fresh optimizer)")
    else:
        if resume:
            print(f"no {ckpt_path}: starting fresh")
        tok = WordTokenizer.fit(d["prompts"], max_len=cfg.model.get("max_text_len", 16))
        model = MiniFlux(cfg.model, tok)
    model.to(dev).train()
    ids = tok.encode(list(d["prompts"])).to(dev)
    null_ids = tok.encode([""]).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MiniFlux {n_params / 1e6:.2f}M params ({sum(p.numel() for p in model.transformer.parameters()) / 1e6:.2f}M "
          f"transformer), {len(images)} images, vocab {len(tok)}, device {dev}")

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas),
                            fused=dev.type == "cuda")
    ema = MiniFlux(model.config, tok).to(dev).eval()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    if resume and ckpt_path.exists():
        opt.load_state_dict(ck["opt"])
        ema.load_state_dict(ck["ema"])
        del ck
    ema_p, model_p = list(ema.parameters()), list(model.parameters())

    weights = torch.tensor(emoji64.identity_weights(d["identity"]) if cfg.balance
                           else np.full(len(images), 1.0 / len(images)), device=dev, dtype=torch.float32)
    compiled = False
    if cfg.compile and dev.type == "cuda":
        # Regional compile (each repeated block, in place; state_dict keys unchanged): the small model is
        # bound by unfused elementwise kernels, and whole-model compile takes minutes.
        model.transformer.compile_repeated_blocks()
        compiled = True
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")

    def step_fn():
        idx = torch.multinomial(weights, cfg.batch_size, replacement=True)
        x = images[idx].float() / 127.5 - 1
        b_ids = ids[idx]
        drop = torch.rand(cfg.batch_size, device=dev) < cfg.p_uncond
        b_ids = torch.where(drop[:, None], null_ids, b_ids)
        with amp:
            loss = model.loss(x, b_ids, t_mean=cfg.t_mean, t_std=cfg.t_std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        return loss, gn

    def save_all():
        tstate = {k: state[k] for k in ("step", "elapsed_s", "samples")}
        torch.save(checkpoint_payload(model, ema, opt, state, tok, cfg), out / "ckpt.pt.tmp")
        (out / "ckpt.pt.tmp").replace(ckpt_path)
        ema.save_pretrained(out / "ema", dtype=torch.float16, extra_config={"train_state": tstate})
        hist = {"train_config": asdict(cfg), "params": n_params, "device": _device_name(dev), **state}
        (out / "ema" / "loss.json").write_text(json.dumps(hist))
        (out / "loss.json").write_text(json.dumps(hist))

    total_s = cfg.minutes * 60
    session_s = (cfg.session_minutes or cfg.minutes) * 60
    t_session = time.time()
    last_ckpt = time.time()
    acc, acc_n = torch.zeros((), device=dev), 0
    bar = tqdm(total=int(total_s), initial=int(state["elapsed_s"]), unit="s", desc="train",
               disable=not progress, mininterval=10)
    t_last = t_log = time.time()
    done_reason = "time"
    while True:
        if state["elapsed_s"] >= total_s:
            break
        if time.time() - t_session >= session_s:
            done_reason = "session"
            break
        if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
            done_reason = "max_steps"
            break
        lr = _lr(cfg, state["step"], state["elapsed_s"] / total_s)
        for g in opt.param_groups:
            g["lr"] = lr
        try:
            loss, gn = step_fn()
        except Exception as e:  # a failed compile must not cost the GPU call: fall back to eager
            if not compiled:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); continuing eager")
            for m in model.transformer.modules():
                m._compiled_call_impl = None  # undo nn.Module.compile
            compiled = False
            opt.zero_grad(set_to_none=True)
            continue
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + state["step"]) / (10 + state["step"]))
            torch._foreach_lerp_(ema_p, model_p, 1 - decay)
        acc += loss.detach()
        acc_n += 1
        state["step"] += 1
        state["samples"] += cfg.batch_size
        now = time.time()
        state["elapsed_s"] += now - t_last
        bar.update(int(state["elapsed_s"]) - bar.n)
        t_last = now
        if state["step"] % cfg.log_every == 0 or state["step"] == 1:
            l = (acc / acc_n).item()
            if not math.isfinite(l):
                raise FloatingPointError(f"loss is {l} at step {state['step']}")
            rec = {"step": state["step"], "elapsed_s": round(state["elapsed_s"], 2), "loss": l, "lr": lr,
                   "grad_norm": float(gn), "img_per_s": round(cfg.batch_size * acc_n / max(1e-9, now - t_log), 1)}
            t_log = time.time()
            state["history"].append(rec)
            bar.set_postfix(loss=f"{l:.4f}", step=state["step"])
            if not progress or state["step"] % (cfg.log_every * 10) == 0:
                print(json.dumps(rec), flush=True)
            acc.zero_()
            acc_n = 0
        if now - last_ckpt >= cfg.ckpt_minutes * 60:
            save_all()
            last_ckpt = time.time()
            t_last = t_log = last_ckpt  # checkpoint writes are not training time
    bar.close()
    save_all()
    ema.eval()
    print(f"stopped ({done_reason}) at step {state['step']}, {state['elapsed_s'] / 60:.2f} min, "
          f"{state['samples']} samples")
    return {"model": ema, "state": state, "reason": done_reason}


def _device_name(dev):
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def plot_loss(loss_json, png, smooth: int = 10):
    """Loss (and lr) against step from loss.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = json.loads(Path(loss_json).read_text())["history"]
    steps = np.array([r["step"] for r in h])
    loss = np.array([r["loss"] for r in h])
    k = max(1, min(smooth, len(loss)))
    sm = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, alpha=0.3, label="loss (per log interval)")
    ax.plot(steps[k - 1:], sm, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow MSE")
    ax.set_ylim(min(loss) * 0.95, np.percentile(loss, 98) * 1.05)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in h], color="gray", lw=0.8, ls="--")
    ax2.set_ylabel("lr", color="gray")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
