"""What a sampler loop needs to know about a ``torch.compile``'d denoiser (no project imports: the mini-FLUX sampler
and rtlynx.cudagraphs both use it).

- :func:`is_compiled`: the module is the wrapper ``torch.compile(module)`` returns, or it or a submodule was compiled
  in place (``Module.compile()``, diffusers' ``compile_repeated_blocks``).
- :func:`mark_step`: ``torch.compiler.cudagraph_mark_step_begin()``, the one call that tells CUDA-graph trees
  (inductor's ``mode="reduce-overhead"``) that a new denoising step begins, so a replay may reuse the memory of the last step's
  outputs but not of this step's (the blocks of a regionally compiled model, CFG's two calls of one step).
- :func:`uncompile`: undo either kind of compile (the wrapper's module, in-place compiles cleared).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def is_wrapper(module: nn.Module) -> bool:
    """``module`` is what ``torch.compile(nn_module)`` returns (checked by name: torch._dynamo loads only when used)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def is_compiled(module: nn.Module) -> bool:
    """Whether calling ``module`` runs compiled code (the whole forward, or some of its submodules')."""
    if is_wrapper(module):
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def mark_step() -> None:
    """A new denoising step begins (CUDA-graph trees; a no-op for every other way of running)."""
    torch.compiler.cudagraph_mark_step_begin()


def uncompile(module: nn.Module) -> nn.Module:
    """The eager module behind ``module``: the wrapper's original module, with every in-place compile cleared."""
    if is_wrapper(module):
        module = module._orig_mod
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return module
