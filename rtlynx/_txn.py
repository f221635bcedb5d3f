"""All-or-nothing changes to a model: snapshot the module tree's attributes, roll back on any exception.

sparsify / load / configure change many objects (module slots, hooks, the shared Settings, the sites, per-layer
overrides); rather than undo each step by hand (and miss one when a step is added), ``transaction`` records the
``__dict__`` of every module of the tree and of the given extra objects, one container level deep (the
``_modules`` / ``_parameters`` / hook dicts and ``_override`` are dicts changed in place), and puts them back.
Tensors listed in ``tensors`` are cloned and copied back too (loading LoRA values into existing parameters writes
them in place). Objects created during the change are simply dropped with the tree that referenced them.
"""

from __future__ import annotations

import collections
import contextlib

import torch

_CONTAINERS = (dict, collections.OrderedDict, list, set)


def _record(obj) -> dict:
    saved = {}
    for key, value in vars(obj).items():
        inner = None
        if type(value) in _CONTAINERS:  # exact types: a subclass may refuse changes (diffusers' FrozenDict)
            inner = list(value.items()) if isinstance(value, dict) else list(value)
        saved[key] = (value, inner)
    return saved


def _restore(obj, saved: dict) -> None:
    d = vars(obj)
    for key in list(d):
        if key not in saved:
            del d[key]
    for key, (value, inner) in saved.items():
        d[key] = value
        if inner is not None:  # the same container object, its old contents (handles and views keep working)
            value.clear()
            if isinstance(value, list):
                value.extend(inner)
            else:
                value.update(inner)


@contextlib.contextmanager
def transaction(module: torch.nn.Module, extra=(), tensors=()):
    """Run the block; on any exception (KeyboardInterrupt included) restore ``module``'s tree, ``extra`` objects
    and ``tensors`` to what they were at entry, then re-raise."""
    objs = list({id(o): o for o in (*module.modules(), *extra) if hasattr(o, "__dict__")}.values())
    saved = [(o, _record(o)) for o in objs]
    values = [(t, t.detach().clone()) for t in tensors if t is not None]
    try:
        yield
    except BaseException:
        for o, s in saved:
            _restore(o, s)
        with torch.no_grad():
            for t, v in values:
                t.copy_(v)
        raise
