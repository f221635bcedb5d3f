"""Global distillation: every compensation LoRA of a model trained jointly against the dense model's output.

The closed form (:mod:`rtlynx.distill`) is the exact optimum of each layer's own error, and it is at its ceiling:
the residual of top-2-of-4 is non-linear and per token. What shows in images is the *model's* error, and later
layers can absorb earlier layers' errors only when they are trained together. Here:

- student: the sparse model (the N:M mask is a constant of the forward; gradients reach the LoRA factors through
  the dense-x branch and the rest of the network); teacher: the same weights run dense (``rtlynx.dense_mode``).
  Base weights are frozen; only ``lora_A`` / ``lora_B`` train, with fp32 master copies when the model is half.
- states: the transformer calls of the *student's own* sampler are recorded (all their arguments), so it learns to
  correct the drift of its own trajectories (a sparse sampler leaves the dense trajectory, and matching the
  teacher on dense states stops paying: issue 18's probe). ``states="dense"`` records the dense sampler instead,
  as the comparison.
- loss: the teacher's output at those states, mean squared error relative to the teacher's energy, optionally
  weighted by noise level (``t_weight``).
- schedule: ``dense_below_t`` trains for the step schedule the LoRA will run with: the rollouts run it (the final
  steps dense) and the calls it runs dense are left out of the batches, so no capacity goes to steps that never
  use the LoRA.
Works on any transformer a :class:`rtlynx.pipelines.Runner` samples (the recorder is a forward pre-hook), with
gradient checkpointing per block where diffusers offers it. Resumable from its checkpoint folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import io, validate
from .api import config_of, configure, sparse_layers
from .calib_plan import MemoryPlan, memory_plan
from .sites import model_sites
from .sites.operand import fill_rank
from .recording import (Call, cat_rows, endpoint_targets, flow_state_arg, record_round, row_error, rows_of, run,
                        velocity_error)

STATE_FILE = "global_state.safetensors"
STATE_META = "global_state.json"
T_WEIGHTS = ("uniform", "late", "early")


class DistillError(RuntimeError):
    """A global distillation that cannot start or go on (the message is one line, for the user)."""


@dataclass
class GlobalConfig:
    """Settings of :func:`train_global`. ``steps`` optimisation steps of ``batch`` rows each (a row: one sample of
    one recorded transformer call, CFG halves apart); a new rollout of ``rollout_prompts`` prompts every
    ``refresh`` steps, the last ``buffer_rounds`` rollouts kept."""

    steps: int = 600
    lr: float = 1e-3
    warmup: int = 20
    batch: int = 128
    calls_per_batch: int = 8
    rollout_prompts: int = 64
    refresh: int = 50
    buffer_rounds: int = 3
    states: str = "student"       # "student": the sparse sampler's own states; "dense": the dense sampler's
    t_weight: str = "uniform"     # "late": weight 1 + 3 (1 - t) on low-noise rows; "early": 1 + 3 t
    target: str = "velocity"      # "endpoint": pulled toward the dense sample of the same noise (recording.endpoint_targets)
    endpoint_weight: float = 1.0  # 0: the velocity target; 1: the full pull
    dense_below_t: float | None = None  # train for this step schedule (SparsityConfig.dense_below_t); None: every step
    grad_clip: float = 1.0
    checkpointing: bool = True    # gradient checkpointing per transformer block, where the model offers it
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100

    def __post_init__(self):
        for name in ("steps", "batch", "calls_per_batch", "rollout_prompts", "refresh", "buffer_rounds",
                     "eval_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("lr", "grad_clip"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if self.states not in ("student", "dense"):
            raise ValueError(f"states must be 'student' or 'dense', got {self.states!r}")
        if self.t_weight not in T_WEIGHTS:
            raise ValueError(f"t_weight must be one of {T_WEIGHTS}, got {self.t_weight!r}")
        if self.target not in ("velocity", "endpoint"):
            raise ValueError(f"target must be 'velocity' or 'endpoint', got {self.target!r}")
        if self.target == "endpoint" and self.states != "student":
            raise ValueError("target='endpoint' needs states='student' (on dense states it is the velocity target)")
        if not (isinstance(self.endpoint_weight, (int, float)) and math.isfinite(self.endpoint_weight)
                and self.endpoint_weight >= 0):
            raise ValueError(f"endpoint_weight must be a finite number >= 0, got {self.endpoint_weight!r}")
        if self.dense_below_t is not None:  # as SparsityConfig.dense_below_t
            validate.real("dense_below_t (or None)", self.dense_below_t, 0.0, 1.0, low_open=True)


def grow_lora_rank(transformer, rank: int | str, seed: int = 0) -> int:
    """Grow every sparse layer's LoRA to ``rank`` (or "fill": ``fill_rank`` of its site's members, at most min(K, N))
    keeping the model's output: A gains rows drawn like nn.Linear's init (seeded), B zero columns, so global
    distillation starts from the LoRA it was given and can use the new capacity from its first step. Layers without a
    LoRA or already at the rank or more stay. Returns how many layers grew."""
    if rank != "fill" and not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise ValueError(f"rank must be a positive int or 'fill', got {rank!r}")
    sites = model_sites(transformer)
    members = {id(l): len(s.layers) for s in sites for l in s.layers}
    g, grown = torch.Generator().manual_seed(seed), 0
    for layer in sparse_layers(transformer).values():  # layer order: the seeded draws do not depend on the sites
        r0 = layer.lora_rank if layer.lora_A is not None else 0
        r = min(fill_rank(members[id(layer)]), layer.in_features, layer.out_features) if rank == "fill" else rank
        if r0 == 0 or r0 >= r:
            continue
        a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        layer.add_lora(r, rebuild=False)
        extra = torch.empty(r - r0, layer.in_features)
        torch.nn.init.kaiming_uniform_(extra, a=math.sqrt(5), generator=g)
        with torch.no_grad():
            layer.lora_A.copy_(torch.cat([a, extra.to(a)]))
            layer.lora_B.zero_()
            layer.lora_B[:, :r0].copy_(b)
        grown += 1
    for site in sites:
        site.build()  # the operands take the wider LoRA tails
    return grown


def t_weights(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row loss weights from noise levels t (1 = noise; rows of unknown t weigh 1)."""
    if kind == "uniform":
        return torch.ones_like(t)
    tt = t.clamp(0, 1)
    w = 1 + 3 * (1 - tt) if kind == "late" else 1 + 3 * tt
    return torch.where(t < 0, torch.ones_like(t), w)


# ---------------------------------------------------------------------------------------------- parameters
def lora_parameters(transformer) -> dict[str, torch.nn.Parameter]:
    """The compensation LoRA factors of every sparse layer, by state-dict-like name."""
    out = {}
    for name, layer in sparse_layers(transformer).items():
        if layer.lora_A is not None:
            out[f"{name}.lora_A"] = layer.lora_A
            out[f"{name}.lora_B"] = layer.lora_B
    return out


# ---------------------------------------------------------------------------------------------- training
class _Master:
    """fp32 master copies of half-precision LoRA factors (an update below half precision's resolution would be
    lost in place); the model's parameters (views into the sites' operands) are written in place after each step."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.master = {k: p.detach().float().clone().requires_grad_(True) for k, p in params.items()}

    def grads_in(self) -> None:
        for k, p in self.params.items():
            g = p.grad
            self.master[k].grad = None if g is None else g.float()
            p.grad = None

    def write_out(self) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.master[k])


def _frozen_except(transformer, keep: dict[str, torch.nn.Parameter]):
    keep_ids = {id(p) for p in keep.values()}
    saved = [(p, p.requires_grad) for p in transformer.parameters()]
    for p in transformer.parameters():
        p.requires_grad_(id(p) in keep_ids)
    return saved


def _save_state(ckpt: Path, transformer, master: _Master, opt, step: int, cfg: GlobalConfig,
                history: list) -> None:
    """The LoRA (rtlynx.save format, loadable on its own) + master weights and Adam moments; written to a temporary
    name and renamed, so an interrupted save leaves the previous checkpoint whole."""
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (k, m) in enumerate(master.master.items()):
        tensors[f"master.{k}"] = m.detach().cpu().contiguous()
        st = opt.state.get(m, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                tensors[f"{name}.{k}"] = st[name].detach().cpu().contiguous()
    tmp = ckpt / (STATE_FILE + ".tmp")
    save_file(tensors, str(tmp))
    meta = {"step": step, "config": asdict(cfg), "history": history}
    (ckpt / (STATE_META + ".tmp")).write_text(json.dumps(meta))
    io.save(transformer, ckpt / "lora", overwrite=True, warn_adapters=False)  # said by the final save, once
    tmp.replace(ckpt / STATE_FILE)
    (ckpt / (STATE_META + ".tmp")).replace(ckpt / STATE_META)


# settings a resumed run may change: its length (the cosine follows the new step count), logging, and memory
RESUME_FREE = ("steps", "eval_every", "save_every", "checkpointing")


def _load_state(ckpt: Path, master: _Master, opt, cfg: GlobalConfig) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((ckpt / STATE_META).read_text())
    saved, now = {**asdict(GlobalConfig()), **meta.get("config", {})}, asdict(cfg)  # older checkpoints: defaults
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if changed:
        raise DistillError(f"{ckpt}: the checkpoint was trained with other settings ({'; '.join(changed)}): resume "
                           "with the same ones (only " + ", ".join(RESUME_FREE) + " may change) or start afresh")
    tensors = load_file(str(ckpt / STATE_FILE))
    missing = [k for k in master.master if f"master.{k}" not in tensors]
    if missing:
        raise DistillError(f"{ckpt}: the checkpoint does not match this model's LoRA layers (missing {missing[0]})")
    step = int(meta["step"])
    with torch.no_grad():
        for k, m in master.master.items():
            src = tensors[f"master.{k}"]
            if src.shape != m.shape:
                raise DistillError(f"{ckpt}: {k} has shape {tuple(src.shape)}, the model's is {tuple(m.shape)}")
            m.copy_(src)
            if f"exp_avg.{k}" in tensors:
                opt.state[m] = {"step": torch.tensor(float(step)), "exp_avg": tensors[f"exp_avg.{k}"].to(m.device),
                                "exp_avg_sq": tensors[f"exp_avg_sq.{k}"].to(m.device)}
    master.write_out()
    return meta


def _lr_at(step: int, cfg: GlobalConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))  # cosine to zero


@contextlib.contextmanager
def _configured(transformer, **changes):
    """The block with some settings changed (a None value: left as it is), then the model's own back: e.g. the
    training forward on the reference path (it needs autograd) inside rollouts and evaluations on the user's backend
    (no gradients: e.g. the fused kernels), or the step schedule the training is for."""
    cfg = config_of(transformer)
    saved = {k: getattr(cfg, k) for k, v in changes.items() if v is not None and v != getattr(cfg, k)}
    if saved:
        configure(transformer, **{k: changes[k] for k in saved})
    try:
        yield
    finally:
        back = {k: v for k, v in saved.items() if getattr(config_of(transformer), k) != v}
        if back:
            configure(transformer, **back)


def trains_on(call: Call, below: float | None) -> bool:
    """Whether a recorded call's rows go into the batches: every call, or with a schedule the calls it runs sparse
    (t >= below; a call of unknown t is kept)."""
    return below is None or call.t is None or call.t >= below


@contextlib.contextmanager
def _no_cudnn_attention():
    """The training forward and backward without cuDNN attention: its backward failed on an H100 (torch 2.11 cu130,
    mini-FLUX, batch 256 x 272 tokens: ``mha_graph.execute(...).is_good()``, an illegal memory access without
    CUDA_LAUNCH_BLOCKING) where the memory-efficient kernel trains. The other backends the caller enabled stay."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = torch.backends.cuda
    keep = [k for k, on in ((SDPBackend.FLASH_ATTENTION, b.flash_sdp_enabled()),
                            (SDPBackend.EFFICIENT_ATTENTION, b.mem_efficient_sdp_enabled()),
                            (SDPBackend.MATH, b.math_sdp_enabled())) if on]
    with sdpa_kernel(keep or [SDPBackend.MATH]):
        yield


def train_global(transformer, rollout: Callable[[list[str], int], object], prompts: list[str],
                 config: GlobalConfig | None = None, val_calls: list[Call] | None = None,
                 eval_fn: Callable[[int], dict] | None = None, checkpoint: str | Path | None = None,
                 resume: bool = False, store_device=None, progress: bool = True, log=print) -> dict:
    """Train every compensation LoRA of the sparsified ``transformer`` jointly against its dense self.

    ``rollout(prompts, seed)`` samples images for prompts (e.g. ``runner.sample(..., latent=True)``): it is run
    with the student to record training states (see the module docstring). ``val_calls`` (from
    :func:`record_round` on held-out prompts) give the held-out velocity error; ``eval_fn(step)`` any other metric
    (e.g. paired PSNR against dense). ``checkpoint``: a folder written every ``save_every`` steps and at the end
    (the LoRA as ``checkpoint/lora``, loadable with ``rtlynx.load``); ``resume=True`` continues from it. A non-finite
    loss stops the run with :class:`DistillError`, the model holding the last good checkpoint's (or the starting)
    LoRA. Returns the history and timings."""
    from tqdm.auto import tqdm

    cfg = config or GlobalConfig()
    params = lora_parameters(transformer)
    if not params:
        raise DistillError("the model has no compensation LoRA to train: start from the closed form "
                           "(`rtlynx train-lora`, or rtlynx.load of a saved LoRA) or sparsify with lora_rank > 0")
    if not prompts:
        raise DistillError("no training prompts")
    if cfg.target == "endpoint":
        try:
            flow_state_arg(transformer)  # refused before any rollout, not after the first
        except ValueError as e:
            raise DistillError(str(e)) from None
    dev = next(transformer.parameters()).device
    master = _Master(params)
    opt = torch.optim.Adam(list(master.master.values()), lr=cfg.lr)
    history: list[dict] = []
    step0 = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume:
        if ckpt is None or not (ckpt / STATE_META).is_file():
            raise DistillError(f"nothing to resume: no {STATE_META} in {ckpt}")
        meta = _load_state(ckpt, master, opt, cfg)
        step0, history = meta["step"], meta["history"]
        log(f"resumed {ckpt} at step {step0}")
    start = {k: m.detach().clone() for k, m in master.master.items()}  # restored on a non-finite loss

    rng = random.Random(cfg.seed + step0)
    order = list(prompts)
    random.Random(cfg.seed).shuffle(order)
    user_backend = config_of(transformer).backend
    stack = contextlib.ExitStack()
    stack.enter_context(_configured(transformer, backend="reference"))  # autograd through the pruned product
    # rollouts and evaluations run the schedule the training is for (the training rows are all above it)
    stack.enter_context(_configured(transformer, dense_below_t=cfg.dense_below_t))
    saved_grad = _frozen_except(transformer, params)
    had_ckpt = bool(getattr(transformer, "gradient_checkpointing", False))
    if cfg.checkpointing and hasattr(transformer, "enable_gradient_checkpointing"):
        try:
            transformer.enable_gradient_checkpointing()
        except ValueError:  # a model without checkpointing support: full activations
            pass
    buffer: list[list[Call]] = []
    timings = {"rollout_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
    peak = None
    round_i = step0 // cfg.refresh
    bar = tqdm(total=cfg.steps, initial=step0, desc="global distill", disable=not progress, unit="step")
    try:
        for step in range(step0, cfg.steps):
            if step == step0 or step % cfg.refresh == 0:
                t0 = time.perf_counter()
                lo = (round_i * cfg.rollout_prompts) % len(order)
                batch_prompts = [order[(lo + i) % len(order)] for i in range(cfg.rollout_prompts)]
                with _configured(transformer, backend=user_backend):
                    fresh = record_round(transformer, rollout, batch_prompts, cfg.seed + 1000 + round_i, cfg.states,
                                         store_device)
                    if cfg.target == "endpoint":  # the dense sampler from the same prompts and noise
                        endpoint_targets(transformer, fresh, record_round(
                            transformer, rollout, batch_prompts, cfg.seed + 1000 + round_i, "dense", store_device),
                            cfg.endpoint_weight)
                    buffer.append(fresh)
                buffer = buffer[-cfg.buffer_rounds:]
                round_i += 1
                timings["rollout_s"] += time.perf_counter() - t0
                if step == step0:
                    log(memory_plan(transformer, params, buffer[0][0] if buffer[0] else None, len(buffer[0]),
                                    "the model's device" if store_device is None else str(store_device),
                                    bool(getattr(transformer, "gradient_checkpointing", False))).report())
            if step == step0 or step % cfg.eval_every == 0:
                with _configured(transformer, backend=user_backend):
                    _evaluate(transformer, step, val_calls, eval_fn, history, timings, log)
            t0 = time.perf_counter()
            calls = [c for r in buffer for c in r if trains_on(c, cfg.dense_below_t)]
            if not calls:
                raise DistillError(f"no recorded call runs sparse under dense_below_t={cfg.dense_below_t} (every "
                                   "call of the rollouts had a lower noise level): lower it or leave it unset")
            picks = rng.sample(range(len(calls)), min(cfg.calls_per_batch, len(calls)))
            per = max(1, cfg.batch // len(picks))
            parts = []
            for j in picks:
                c = calls[j]
                idx = torch.tensor(sorted(rng.sample(range(c.rows), min(per, c.rows))))
                parts.append(rows_of(c, idx))
            args, kwargs, target, t = cat_rows(parts)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            with _no_cudnn_attention():  # the backward's recompute (checkpointing) runs inside it too
                out = run(transformer, args, kwargs)
                d, e = row_error(out, target.to(dev))
                w = t_weights(t, cfg.t_weight).to(dev)
                loss = (w * d).sum() / e.sum().clamp_min(1e-30)
                if not torch.isfinite(loss):
                    raise DistillError(f"non-finite loss at step {step}: the LoRA is back at the last good state "
                                       f"({'checkpoint ' + str(ckpt) if ckpt is not None and (ckpt / STATE_META).is_file() else 'the start'}); "
                                       "try a lower lr")
                loss.backward()
            master.grads_in()
            torch.nn.utils.clip_grad_norm_(list(master.master.values()), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            master.write_out()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            step_s = time.perf_counter() - t0
            timings["train_s"] += step_s
            if peak is None and dev.type == "cuda":
                peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30
                log(f"measured peak GPU memory after the first step: {peak:.2f} GiB")
            rel = float((d.sum() / e.sum().clamp_min(1e-30)).detach())
            bar.set_postfix(loss=f"{rel:.4f}")
            bar.update(1)
            history.append(dict(step=step + 1, train_rel_err=rel, lr=_lr_at(step, cfg), step_s=step_s))
            if ckpt is not None and (step + 1) % cfg.save_every == 0:
                _save_state(ckpt, transformer, master, opt, step + 1, cfg, history)
                start = {k: m.detach().clone() for k, m in master.master.items()}
        with _configured(transformer, backend=user_backend):
            _evaluate(transformer, cfg.steps, val_calls, eval_fn, history, timings, log)
        if ckpt is not None:
            _save_state(ckpt, transformer, master, opt, cfg.steps, cfg, history)
    except DistillError:
        with torch.no_grad():
            for k, m in master.master.items():
                m.copy_(start[k])
        master.write_out()
        raise
    finally:
        bar.close()
        stack.close()
        for p, rg in saved_grad:
            p.requires_grad_(rg)
        if not had_ckpt and hasattr(transformer, "disable_gradient_checkpointing"):
            try:
                transformer.disable_gradient_checkpointing()
            except ValueError:
                pass
        for p in params.values():
            p.grad = None
    return {"history": history, "timings": timings, "peak_gib": peak, "config": asdict(cfg),
            "lora_params": sum(p.numel() for p in params.values())}


def _evaluate(transformer, step, val_calls, eval_fn, history, timings, log):
    t0 = time.perf_counter()
    row = {"step": step}
    if val_calls:
        row["val_rel_err"] = velocity_error(transformer, val_calls)
    if eval_fn is not None:
        row.update(eval_fn(step))
    timings["eval_s"] += time.perf_counter() - t0
    history.append(row)
    log("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


__all__ = ["DistillError", "GlobalConfig", "MemoryPlan", "lora_parameters", "memory_plan", "t_weights", "train_global",
           "trains_on"]
