"""CUDA graphs across denoising steps: a whole transformer, dense or sparsified, under
``torch.compile(mode="reduce-overhead")``, called by a sampler step after step.

CUDA-graph trees (inductor) replay every compiled graph into one memory pool. Left to itself, each top-level call of
a compiled function starts a new generation whose replays may overwrite any earlier output. A regionally compiled
model (each block its own graph, eager code between them reading the last block's output) or a pipeline that calls
the transformer twice in a step (true CFG: Qwen-Image) then reads an overwritten output and fails with "accessing
tensor output of CUDAGraphs that has been overwritten by a subsequent run". The fix diffusers users apply is
``torch.compiler.cudagraph_mark_step_begin()`` once per denoising step: every output of a step stays valid until the
next step begins.

:class:`StepMarker` (``mark_steps(model)``) does that from a forward pre-hook that runs outside the compiled region:
a call with a new noise level begins a step (CFG's second call of the same step joins it). The same host read of the
noise level (one device sync per call, as the step schedule has always done) drives rtlynx's step schedule
(``dense_below_t``, ``dense_above_t``), so the compiled forward holds no host read: no graph break, and the model
compiles to two graphs (sparse and dense) that both replay.

:func:`compile` compiles a pipeline's (or a model's) transformer, whole or block by block (``regional=True``:
diffusers' ``compile_repeated_blocks``, minutes less compile), with a marker; :func:`uncompile` undoes it::

    pipe = rtlynx.cudagraphs.compile(pipe)   # mode="reduce-overhead"; pipe.transformer is now the compiled wrapper
    image = pipe("a cat", num_inference_steps=28).images[0]

Your own sampler loop needs no marker if it calls ``torch.compiler.cudagraph_mark_step_begin()`` at the start of each
step. After the first mark, CUDA-graph trees begin generations only at marks, process-wide: a loop that calls a
compiled model outside a marked sampler (a timing loop) marks each call itself (``rtlynx._compile.mark_step``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import _compile, schedule
from .integrations.diffusers import as_module

MARKER = "_rtlynx_step_marker"
_NONE = object()  # no call seen yet: the first call begins a step


class StepMarker:
    """Marks a CUDA-graph step at the first call of each denoising step of ``called`` (the module the sampler calls:
    a ``torch.compile`` wrapper, a module compiled in place, or an eager module whose blocks are compiled) and sets
    the step schedule's gate for the call. ``steps``: steps marked so far."""

    def __init__(self, called: nn.Module):
        if getattr(called, MARKER, None) is not None:
            raise ValueError(f"{type(called).__name__} already has a step marker; remove it first")
        self.called = called
        self.module = called._orig_mod if _compile.is_wrapper(called) else called  # whose forward takes the time
        self.steps = 0
        self._last = _NONE
        self._handle = self._inner = None
        if not _compile.is_wrapper(called) and getattr(called, "_compiled_call_impl", None) is not None:
            # compiled in place: the module's own hooks run inside the graph, so the marker wraps the compiled call
            inner = self._inner = called._compiled_call_impl

            def call(*args, **kwargs):
                self.before_call(args, kwargs)
                return inner(*args, **kwargs)

            called._compiled_call_impl = call
        else:
            self._handle = called.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        setattr(called, MARKER, self)
        self._external(True)  # from the first call on: the model's own hook may run before this one

    def _external(self, on: bool) -> None:
        gate = schedule.gate_of(self.module)
        if gate is not None:
            gate.external = on

    def _pre_hook(self, _module, args, kwargs):
        self.before_call(args, kwargs)

    def before_call(self, args, kwargs) -> None:
        t = schedule.noise_level(self.module, args, kwargs)
        if t is None or t != self._last:  # no time argument: every call is a step of its own
            _compile.mark_step()
            self.steps += 1
        self._last = t
        gate = schedule.gate_of(self.module)
        if gate is not None:  # a gate installed after the marker (configure) is driven from here too
            gate.external = True
            gate.set_level(self.module, t)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        if self._inner is not None:
            self.called._compiled_call_impl = self._inner
        self._handle = self._inner = None
        self._external(False)
        if getattr(self.called, MARKER, None) is self:
            delattr(self.called, MARKER)


def mark_steps(model) -> StepMarker:
    """A :class:`StepMarker` on ``model`` (a module, a ``torch.compile`` wrapper, or a pipeline: its transformer)."""
    return StepMarker(as_module(model))


def compile(model, mode: str | None = "reduce-overhead", regional: bool = False, **compile_kw):  # noqa: A001
    """Compile ``model``'s denoiser with a step marker. ``model``: a diffusers pipeline (its ``transformer`` becomes
    the compiled wrapper; the pipeline is returned) or a module (the module to call is returned). ``regional``:
    compile each repeated block in place (diffusers' ``compile_repeated_blocks``) instead of the whole forward.
    ``compile_kw`` go to ``torch.compile`` (``fullgraph``, ``backend``, ``dynamic``...)."""
    module = as_module(model)
    if _compile.is_compiled(module):
        raise ValueError(f"{type(module).__name__} is compiled already; rtlynx.cudagraphs.uncompile(...) first")
    if mode is not None:
        compile_kw["mode"] = mode
    if regional:
        if not callable(getattr(module, "compile_repeated_blocks", None)):
            raise ValueError(f"{type(module).__name__} has no compile_repeated_blocks (a diffusers model with "
                             "_repeated_blocks): compile it whole (regional=False)")
        module.compile_repeated_blocks(**compile_kw)
        called = module
    else:
        called = torch.compile(module, **compile_kw)
    StepMarker(called)
    if model is module:
        return called
    model.transformer = called
    return model


def uncompile(model):
    """Undo :func:`compile` (or any compile of ``model``'s denoiser): marker removed, eager module back in place.
    Returns the pipeline, or the eager module."""
    called = as_module(model)
    marker = getattr(called, MARKER, None)
    if marker is not None:
        marker.remove()
    module = _compile.uncompile(called)
    if model is called:
        return module
    model.transformer = module
    return model
