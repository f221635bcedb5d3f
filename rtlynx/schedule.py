"""Which sampling steps run sparse: ``SparsityConfig.dense_below_t`` and ``dense_above_t``.

The last, low-noise steps of a sampler write the fine detail of the image; an activation-sparsity error
made there is not denoised away by later steps and shows as grain (on the mini-FLUX it is most of the FID
loss: benchmarks/results/fid_ablation.json). ``dense_below_t = a`` runs every sparse layer dense while the
noise level t of the transformer call (1 = pure noise, 0 = clean) is below a. The level is read on the host
from the call's time argument once per forward (one device sync), by a forward pre-hook on the model; under
``torch.compile`` a step marker outside the compiled region reads it instead (rtlynx.cudagraphs: ``gate.external``),
so the compiled forward holds no host read (no graph break) and switches between two graphs, sparse and dense.
``dense_above_t = b`` does the same for the first steps (t > b): with a strong style adapter they decide the
composition, and their sparsity error sends the sample elsewhere (benchmarks/NOTES.md v14).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from .backends import warn_once
from .presets import DEFAULT_TIME_ARG, TIME_ARGS

_HOOK = "_rtlynx_step_hook"
GATE = "_rtlynx_step_gate"


class StepGate:
    """Shared by the sparse layers of one model; ``dense`` is set before each forward of the model: by the model's
    own pre-hook, or (``external``) by a caller outside a compiled region (rtlynx.cudagraphs.StepMarker)."""

    def __init__(self, below: float | None, above: float | None = None):
        self.below, self.above = below, above
        self.dense = False
        self.last_t = None
        self.external = False

    def set_level(self, module: nn.Module, t: float | None) -> None:
        """This forward's noise level ``t`` (None: the call had no time argument: sparse, with a warning)."""
        self.last_t = t
        if t is None:
            warn_once(f"notime:{type(module).__name__}",
                      f"rtlynx: a step schedule is set but {type(module).__name__} was called without a "
                      f"{time_arg(module)[0]!r} argument; running sparse at every step")
            self.dense = False
        else:
            self.dense = (self.below is not None and t < self.below) or (self.above is not None and t > self.above)


def gate_of(module: nn.Module) -> StepGate | None:
    """The step gate of a model with a schedule installed, else None."""
    return getattr(module, GATE, None)


def time_arg(module: nn.Module) -> tuple[str, float]:
    """(name of the forward argument carrying the diffusion time, the value that means pure noise)."""
    return TIME_ARGS.get(type(module).__name__, DEFAULT_TIME_ARG)


def noise_level(module: nn.Module, args, kwargs) -> float | None:
    """The noise level t (1 = noise, 0 = clean) of a call ``module(*args, **kwargs)``, None if it has no
    time argument. The noisiest sample of the batch decides; values above 1 are on the 0-1000 scale."""
    arg, noise_at = time_arg(module)
    value = kwargs.get(arg)
    if value is None and args:
        try:
            value = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get(arg)
        except TypeError:
            value = None
    if value is None:
        return None
    t = torch.as_tensor(value).detach().float()
    if t.numel() == 0:
        return None
    t = float(t.max() if noise_at == 1.0 else t.min())
    if t > 1.0:
        t /= 1000.0
    return t if noise_at == 1.0 else 1.0 - t


def install(module: nn.Module, layers, below: float | None, above: float | None = None) -> None:
    """(Re)install the step schedule on ``module`` for ``layers``; both None removes it."""
    remove(module, layers)
    if below is None and above is None:
        return
    gate = StepGate(below, above)
    for layer in layers:
        layer._step_gate = gate

    def pre_hook(mod, args, kwargs):
        if gate.external:  # set for this call by a step marker outside the compiled region
            return
        gate.set_level(mod, noise_level(mod, args, kwargs))

    setattr(module, GATE, gate)
    setattr(module, _HOOK, module.register_forward_pre_hook(pre_hook, with_kwargs=True))


def remove(module: nn.Module, layers) -> None:
    handle = getattr(module, _HOOK, None)
    if handle is not None:
        handle.remove()
        delattr(module, _HOOK)
    if GATE in vars(module):
        delattr(module, GATE)
    for layer in layers:
        layer._step_gate = None
