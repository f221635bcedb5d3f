"""Checking a sparsified model's sites on the inputs they really see against the per-layer spec."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import reference
from ..families import family_of
from . import adapters
from .grouping import model_sites


def verify(model: nn.Module, *args, prefixes: tuple[str, ...] | None = None, **kwargs) -> dict[str, float]:
    """Run ``model(*args, **kwargs)`` once and compare every site (optionally only those whose name starts with one
    of ``prefixes``) on the inputs it really sees with the per-layer reference spec
    (:func:`rtlynx.reference.sparse_act_linear` in float32 on the same operands; with ``dtype="fp8"`` the FP8 spec
    :func:`rtlynx.reference.fp8.fp8_sparse_act_linear`): ``{site name: relative error}``.
    Independent of the drift between whole forwards (a rounding difference that flips a near-tie top-2 choice
    downstream makes two correct paths diverge)."""
    # (row-parallel sites are left out: a layer's output there is the sum over ranks, not a function of its input)
    picked = [s for s in model_sites(model) if (prefixes is None or s.name.startswith(prefixes)) and not s.row_parallel]
    seen: dict = {}
    hooks = []

    def grab(key):
        def hook(mod, args, *rest):  # rest: (out,) or (kwargs, out); user_tail: the user's adapters rode along
            seen[key] = (args[0].detach(), rest[-1].detach(), len(rest) == 2 and bool(rest[0].get("user_tail")))
        return hook

    for site in picked:
        # (a user's adapter on the GELU site's layer: the FeedForward runs GELU on its own, the layer sees its input)
        if site.producer == "gelu" and adapters.source(site.layers[0]) is None:
            parent = model.get_submodule(site.name)
            # the module whose output the site prunes from, as the integration that wired the producer named it
            hooks.append(parent.get_submodule(site.producer_input).register_forward_hook(grab((site.name, "h"))))
            hooks.append(parent.register_forward_hook(grab((site.name, "y"))))
        else:
            for i, layer in enumerate(site.layers):
                hooks.append(layer.register_forward_hook(grab((site.name, i)), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()

    def spec(layer, x, user_tail=False):
        a, b = adapters.member_factors(layer._site, layer, user_tail)
        x2, w = x.reshape(-1, layer.in_features), layer.dense_weight()
        cfg = layer._settings.config
        c = None if cfg.centre is None else reference.row_centres(x)
        if layer.in_features % layer.m:  # the layer zero-pads the last group (k_remainder="pad")
            x2, w = reference.pad_to_multiple(x2, layer.m), reference.pad_to_multiple(w, layer.m)
            a = None if a is None else reference.pad_to_multiple(a, layer.m)
            c = None if c is None else reference.pad_to_multiple(c, layer.m)
        return family_of(cfg.dtype).spec(layer, x2, w, a, b, c)

    errs = {}
    with torch.no_grad():
        for site in picked:
            if (site.name, "h") in seen:
                (_, h, _), (_, y, _) = seen[(site.name, "h")], seen[(site.name, "y")]
                want = spec(site.layers[0], reference.gelu_tanh(h))
                got = y.reshape(want.shape)
            else:
                if any((site.name, i) not in seen for i in range(len(site.layers))):
                    continue
                parts = [(spec(l, seen[(site.name, i)][0], seen[(site.name, i)][2]), seen[(site.name, i)][1])
                         for i, l in enumerate(site.layers)]
                want = torch.cat([w for w, _ in parts], 1)
                got = torch.cat([g.reshape(w.shape) for w, g in parts], 1)
            errs[site.name] = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
    return errs
