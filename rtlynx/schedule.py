"""Which sampling steps run sparse: ``SparsityConfig.dense_below_t``.

The last, low-noise steps of a sampler write the fine detail of the image; an activation-sparsity error
made there is not denoised away by later steps and shows as grain (on the mini-FLUX it is most of the FID
loss: benchmarks/results/fid_ablation.json). ``dense_below_t = a`` runs every sparse layer dense while the
noise level t of the transformer call (1 = pure noise, 0 = clean) is below a. The level is read on the host
from the call's time argument once per forward (one device sync), by a forward pre-hook on the model.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from .backends import warn_once
from .presets import DEFAULT_TIME_ARG, TIME_ARGS

_HOOK = "_rtlynx_step_hook"


class StepGate:
    """Shared by the sparse layers of one model; ``dense`` is set before each forward of the model."""

    def __init__(self, below: float, arg: str, noise_at: float):
        self.below, self.arg, self.noise_at = below, arg, noise_at
        self.dense = False
        self.last_t = None

    def noise_level(self, value) -> float | None:
        if value is None:
            return None
        t = torch.as_tensor(value).detach().float()
        if t.numel() == 0:
            return None
        t = t.max() if self.noise_at == 1.0 else t.min()  # the noisiest sample of the batch decides
        t = float(t)
        if t > 1.0:  # 0-1000 scale
            t /= 1000.0
        return t if self.noise_at == 1.0 else 1.0 - t


def _time_value(module: nn.Module, arg: str, args, kwargs):
    if arg in kwargs:
        return kwargs[arg]
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get(arg)


def install(module: nn.Module, layers, below: float | None) -> None:
    """(Re)install the step schedule on ``module`` for ``layers``; ``below=None`` removes it."""
    remove(module, layers)
    if below is None:
        return
    arg, noise_at = TIME_ARGS.get(type(module).__name__, DEFAULT_TIME_ARG)
    gate = StepGate(below, arg, noise_at)
    for layer in layers:
        layer._step_gate = gate

    def pre_hook(mod, args, kwargs):
        t = gate.noise_level(_time_value(mod, arg, args, kwargs))
        gate.last_t = t
        if t is None:
            warn_once(f"notime:{type(mod).__name__}",
                      f"rtlynx: dense_below_t is set but {type(mod).__name__} was called without a {arg!r} "
                      "argument; running sparse at every step")
            gate.dense = False
        else:
            gate.dense = t < gate.below

    setattr(module, _HOOK, module.register_forward_pre_hook(pre_hook, with_kwargs=True))


def remove(module: nn.Module, layers) -> None:
    handle = getattr(module, _HOOK, None)
    if handle is not None:
        handle.remove()
        delattr(module, _HOOK)
    for layer in layers:
        layer._step_gate = None
