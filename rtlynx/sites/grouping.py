"""Grouping sparse layers into sites: by the presets' site rules, in module order."""

from __future__ import annotations

import fnmatch

import torch.nn as nn

from .core import Site


def group_sites(names: list[str], rules) -> list[tuple[list[str], str, str]]:
    """Partition sparse layer ``names`` into sites: ``[(member names, producer, parent name)]`` in module order.

    A rule ``(parent glob, producer, members)`` claims, for every parent matching the glob, the members found
    under it (the site is named after the parent); a layer joins the first rule that names it; unclaimed layers are
    sites of their own, named after the layer."""
    claimed: set[str] = set()
    groups = []
    for parent_glob, producer, members in rules:
        by_parent: dict[str, dict[str, str]] = {}
        for name in names:
            if name in claimed:
                continue
            for mem in members:
                if name == mem or name.endswith("." + mem):
                    parent = name[: len(name) - len(mem)].rstrip(".")
                    if fnmatch.fnmatchcase(parent, parent_glob):
                        by_parent.setdefault(parent, {})[mem] = name
                    break
        for parent, found in by_parent.items():
            ordered = [found[m] for m in members if m in found]
            claimed.update(ordered)
            groups.append((ordered, producer, parent))
    for name in names:
        if name not in claimed:
            groups.append(([name], "plain", name))  # a site of its own is named after its layer
    order = {n: i for i, n in enumerate(names)}
    groups.sort(key=lambda g: min(order[n] for n in g[0]))
    return groups


def adapter_wrapper(mod: nn.Module) -> bool:
    """Whether ``mod`` is an adapter's wrapper: a PEFT layer (the user's own LoRA) keeps the layer it wraps as
    ``base_layer``, at the layer's own name."""
    return callable(getattr(mod, "get_base_layer", None)) and "base_layer" in mod._modules


def layer_at(module: nn.Module, name: str) -> nn.Module:
    """The module at ``name``, through adapter wrappers."""
    mod = module.get_submodule(name)
    while adapter_wrapper(mod):
        mod = mod._modules["base_layer"]
    return mod


def build_sites(module: nn.Module, names: list[str], rules) -> list[Site]:
    """Group the (already replaced) sparse layers ``names`` of ``module`` into sites (the caller wires their
    producers into the model: rtlynx.integrations.diffusers.install_producer)."""
    sites = []
    for members, producer, parent in group_sites(names, rules):
        layers = [layer_at(module, n) for n in members]
        if len({l.in_features for l in layers}) > 1:  # a rule matched layers of different K: one site each
            for n, l in zip(members, layers):
                sites.append(Site([l], "plain", n))
            continue
        sites.append(Site(layers, producer, parent))
    return sites


def model_sites(module: nn.Module) -> list[Site]:
    """The distinct sites of the sparse layers of ``module``, in module order."""
    seen, out = set(), []
    for mod in module.modules():
        site = getattr(mod, "_site", None)
        if site is not None and id(site) not in seen:
            seen.add(id(site))
            out.append(site)
    return out
