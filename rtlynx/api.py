"""The public verb `sparsify` and the few helpers around it (configure, summary, unsparsify)."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import schedule
from .config import SparsityConfig
from .nn import SparseActLinear, check_choice
from .presets import CONDITIONING_EXCLUDES, PRESETS, resolve_preset


def _as_module(model) -> nn.Module:
    """Accept a module or a diffusers pipeline (whose denoiser is ``.transformer``)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "transformer", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected an nn.Module or a pipeline with a .transformer, got {type(model).__name__}")


def layer_rules(model: nn.Module, config: SparsityConfig) -> tuple[list[str], list[str]]:
    """(include, exclude) globs for ``model`` under ``config``: the preset's plus the config's own."""
    preset = resolve_preset(config.preset, type(model).__name__)
    include = list(PRESETS[preset]["include"]) if preset else []
    exclude = list(PRESETS[preset]["exclude"]) if preset else []
    return include + list(config.include), exclude + list(config.exclude) + list(CONDITIONING_EXCLUDES)


def _matches(name: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def eligible_layers(model, config: SparsityConfig | None = None) -> list[str]:
    """Qualified names of the nn.Linear layers ``sparsify`` would replace, in module order."""
    model = _as_module(model)
    config = config or SparsityConfig()
    include, exclude = layer_rules(model, config)
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and _matches(name, include) and not _matches(name, exclude)]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def sparsify(model, config: SparsityConfig | None = None, **overrides):
    """Replace eligible ``nn.Linear`` layers of ``model`` in place by :class:`SparseActLinear`.

    ``config`` defaults to ``SparsityConfig()`` (2:4, norm compensation, preset chosen by model
    class); keyword overrides change single fields, e.g. ``sparsify(model, lora_rank=64)``.
    Returns the model (a pipeline's transformer is sparsified in place; the pipeline is returned).
    Raises if nothing matched, so a wrong preset never silently leaves the model dense.
    """
    module = _as_module(model)
    config = config or SparsityConfig()
    if overrides:
        config = SparsityConfig.from_dict({**config.to_dict(), **overrides})
    names = eligible_layers(module, config)
    if not names:
        already = sum(isinstance(m, SparseActLinear) for m in module.modules())
        hint = " (it is already sparsified)" if already else ""
        raise ValueError(f"no nn.Linear of {type(module).__name__} matches the sparsity rules{hint}; "
                         f"check config.preset / include / exclude")
    for name in names:
        lin = module.get_submodule(name)
        _set_submodule(module, name, SparseActLinear(
            lin, n=config.n, m=config.m, compensation=config.compensation, lora_rank=config.lora_rank,
            backend=config.backend, k_remainder=config.k_remainder, eps=config.eps))
    module._rtlynx_config = config
    schedule.install(module, sparse_layers(module).values(), config.dense_below_t)
    return model


def sparse_layers(model) -> dict[str, SparseActLinear]:
    """name -> SparseActLinear for every sparsified layer of ``model``."""
    return {n: m for n, m in _as_module(model).named_modules() if isinstance(m, SparseActLinear)}


def unsparsify(model):
    """Undo :func:`sparsify`: put plain nn.Linear layers (same weight/bias objects) back; LoRA is dropped."""
    module = _as_module(model)
    schedule.remove(module, sparse_layers(module).values())
    for name, layer in sparse_layers(module).items():
        _set_submodule(module, name, layer.to_linear())
    if hasattr(module, "_rtlynx_config"):
        del module._rtlynx_config
    return model


_UNSET = object()


def configure(model, mode: str | None = None, compensation: str | None = None, lora: bool | None = None,
              backend: str | None = None, dense_below_t=_UNSET):
    """Switch every sparsified layer at once, without rebuilding: ``mode`` "sparse" / "dense" /
    "weight" (magnitude N:M on W, a baseline), ``compensation`` "none" / "norm", ``lora`` on/off,
    ``dense_below_t`` the final-steps schedule (a float, or None for sparse at every step)."""
    module = _as_module(model)
    layers = sparse_layers(module)
    if not layers:
        raise ValueError("model has no SparseActLinear layers; call rtlynx.sparsify first")
    for name, value in (("mode", mode), ("compensation", compensation), ("backend", backend)):
        if value is not None:
            check_choice(name, value)  # all checked before any layer changes
    if dense_below_t is not _UNSET:
        config = dataclasses.replace(getattr(module, "_rtlynx_config", None) or SparsityConfig(),
                                     dense_below_t=dense_below_t)  # validates
        module._rtlynx_config = config
        schedule.install(module, layers.values(), dense_below_t)
    for layer in layers.values():
        if mode is not None:
            layer.mode = mode
        if compensation is not None:
            layer.compensation = compensation
        if lora is not None:
            layer.lora_enabled = lora
        if backend is not None:
            layer.backend = backend
    return model


@contextlib.contextmanager
def dense_mode(model):
    """Run the model dense inside the block (A/B comparisons), restoring each layer's mode after."""
    layers = sparse_layers(model)
    saved = {n: l.mode for n, l in layers.items()}
    try:
        for layer in layers.values():
            layer.mode = "dense"
        yield model
    finally:
        for n, layer in layers.items():
            layer.mode = saved[n]


@dataclass
class LayerInfo:
    name: str
    in_features: int
    out_features: int
    rows: int | None
    sparse: bool
    flops: float


@dataclass
class Summary:
    layers: list[LayerInfo]
    flops_measured: bool
    dense_below_t: float | None = None

    @property
    def sparse_flop_share(self) -> float:
        total = sum(l.flops for l in self.layers)
        return sum(l.flops for l in self.layers if l.sparse) / total if total else 0.0

    def __str__(self) -> str:
        n_sparse = sum(l.sparse for l in self.layers)
        basis = "measured on the given inputs" if self.flops_measured else "weights only (M assumed equal)"
        lines = [f"{'layer':60s} {'K':>6s} {'N':>6s} {'M':>6s}  sparse"]
        for l in self.layers:
            lines.append(f"{l.name[:60]:60s} {l.in_features:6d} {l.out_features:6d} "
                         f"{'-' if l.rows is None else l.rows:>6}  {'yes' if l.sparse else 'no'}")
        lines.append(f"{n_sparse}/{len(self.layers)} linear layers sparse, covering "
                     f"{100 * self.sparse_flop_share:.1f}% of linear FLOPs ({basis})")
        if self.dense_below_t is not None:
            lines.append(f"sparse layers run dense on the final steps (noise level t < {self.dense_below_t})")
        return "\n".join(lines)


def summary(model, *args, **kwargs) -> Summary:
    """What is sparse and the share of linear FLOPs it covers.

    With example inputs (``summary(model, **forward_kwargs)``) the FLOPs are counted from one
    forward pass (rows M per layer, so conditioning-only layers weigh what they really cost);
    without, every layer is assumed to see the same number of rows.
    """
    module = _as_module(model)
    linears = {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, SparseActLinear))}
    rows: dict[str, int] = {}
    if args or kwargs:
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: rows.__setitem__(
            n, rows.get(n, 0) + inp[0].numel() // inp[0].shape[-1])) for n, m in linears.items()]
        try:
            with torch.no_grad(), dense_mode(module):
                module(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
    infos = []
    for n, m in linears.items():
        r = rows.get(n) if rows else None
        flops = 2.0 * m.in_features * m.out_features * (r if r is not None else (0 if rows else 1))
        infos.append(LayerInfo(n, m.in_features, m.out_features, r, isinstance(m, SparseActLinear), flops))
    config = getattr(module, "_rtlynx_config", None)
    return Summary(infos, flops_measured=bool(rows), dense_below_t=config.dense_below_t if config else None)
