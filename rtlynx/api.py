"""The public verb `sparsify` and the few helpers around it (configure, summary, unsparsify)."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

import torch.distributed as dist

from . import schedule
from ._txn import transaction
from .config import SparsityConfig
from .integrations import diffusers as hf
from .integrations import peft as adapters
from .integrations.diffusers import as_module as _as_module
from .nn import OVERRIDABLE, SparseActLinear
from .presets import (CONDITIONING_EXCLUDES, DEFAULT_SITES, PRESETS, SPEED_RULES, outside_blocks, preset_file_config,
                      resolve_preset)
from .sites import Settings, build_sites, layer_at, model_sites, shard
from .sites.grouping import adapter_wrapper


def layer_rules(model: nn.Module, config: SparsityConfig) -> tuple[list[str], list[str]]:
    """(include, exclude) globs for ``model`` under ``config``: the preset's plus the config's own."""
    preset = resolve_preset(config.preset, type(model).__name__)
    include = list(PRESETS[preset]["include"]) if preset else []
    exclude = list(PRESETS[preset]["exclude"]) if preset else []
    return include + list(config.include), exclude + list(config.exclude) + list(CONDITIONING_EXCLUDES)


def site_rules(model: nn.Module, config: SparsityConfig):
    """The activation-site rules (rtlynx.presets) for ``model`` under ``config``."""
    if not config.fuse_sites:
        return ()
    # preset None (explicit include globs, e.g. a preset file from rtlynx.select): the model class's own sites
    preset = resolve_preset(config.preset or "auto", type(model).__name__)
    return PRESETS[preset].get("sites", DEFAULT_SITES) if preset else DEFAULT_SITES


def settings_of(model) -> Settings | None:
    """The one shared Settings of a sparsified model (None if it is not sparsified)."""
    return getattr(_as_module(model), "_rtlynx_settings", None)


def config_of(model) -> SparsityConfig | None:
    """The SparsityConfig a sparsified model runs with (None if it is not sparsified)."""
    st = settings_of(model)
    return None if st is None else st.config


def _matches(name: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _layers_of(model: nn.Module, cls) -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` of the ``cls`` layers of ``model`` by the names they have without adapters: a layer a
    user's PEFT adapter wraps under its wrapper's name, the adapters' own Linears left out."""
    wrapped = {n for n, m in model.named_modules() if adapter_wrapper(m)}
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, cls):
            continue
        parent = name.rpartition(".")[0]
        while name.endswith(".base_layer") and parent in wrapped:
            name, parent = parent, parent.rpartition(".")[0]
        parts = name.split(".")
        if not any(".".join(parts[:i]) in wrapped for i in range(1, len(parts))):
            out.append((name, mod))
    return out


def eligible_layers(model, config: SparsityConfig | None = None) -> list[str]:
    """Qualified names of the nn.Linear layers ``sparsify`` would replace, in module order (a layer wrapped by a
    user's adapter counts, under its own name)."""
    model = _as_module(model)
    config = config or SparsityConfig()
    include, exclude = layer_rules(model, config)
    return [name for name, mod in _layers_of(model, nn.Linear)
            if _matches(name, include) and not _matches(name, exclude)]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` (inside the adapter wrapper there, if any)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    while adapter_wrapper(getattr(parent, child)):
        parent, child = getattr(parent, child), "base_layer"
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
    if config.preset and config.preset.endswith(".json"):  # a preset file (rtlynx select): its exact layer names
        config = preset_file_config(config, module)
    names = eligible_layers(module, config)
    if not names:
        already = sum(isinstance(m, SparseActLinear) for m in module.modules())
        hint = " (it is already sparsified)" if already else ""
        raise ValueError(f"no nn.Linear of {type(module).__name__} matches the sparsity rules{hint}; "
                         f"check config.preset / include / exclude")
    if sparse_layers(module):
        raise ValueError(f"{type(module).__name__} is already sparsified; rtlynx.unsparsify it first "
                         "(or change settings with rtlynx.configure)")
    check_layers(module, names, config.lora_rank)
    with transaction(module):  # all or nothing: an error in the 25th site leaves the model dense, as it was
        _apply(module, names, config, config.lora_rank)
    return model


def check_layers(module: nn.Module, names, lora_rank: int | dict) -> None:
    """Before anything changes: a LoRA rank fits each layer (rank <= min(K, N); ``lora_rank`` an int or name ->
    rank), the weights are real (not on the meta device), and a warning for layers outside the blocks."""
    for name in names:
        lin = layer_at(module, name)
        r = lora_rank if isinstance(lora_rank, int) else lora_rank[name]
        if r > min(lin.in_features, lin.out_features):
            raise ValueError(f"lora_rank {r} exceeds min(K, N) = {min(lin.in_features, lin.out_features)} of layer "
                             f"{name!r} ({lin.in_features}->{lin.out_features}); a rank above it adds nothing")
        if lin.weight.is_meta:
            raise ValueError(f"layer {name!r} is on the meta device: assign the model's weights first "
                             "(e.g. load_state_dict(..., assign=True)), then sparsify / load")
    odd = outside_blocks(names)
    if odd:
        warnings.warn(f"rtlynx: sparsifying {len(odd)} layer(s) outside the transformer blocks ({odd[:3]}"
                      f"{'...' if len(odd) > 3 else ''}): embedders, modulation and output heads gain no speed and "
                      "lose the most quality", RuntimeWarning, stacklevel=3)


def _apply(module: nn.Module, names: list[str], config: SparsityConfig, lora_rank: int) -> None:
    """Replace ``names`` by SparseActLinear layers (LoRA of ``lora_rank``, 0 = none) sharing one
    Settings(config), grouped into sites by the config's site rules."""
    settings = Settings(config)
    shards = shard.layer_shards(module, names, config)  # tensor parallelism: checked before anything changes
    for name in names:
        hooks = getattr(layer_at(module, name), "_diffusers_hook", None)
        if hooks is not None and hooks.hooks:
            raise ValueError(f"{name} carries diffusers hooks ({sorted(hooks.hooks)}) that replacing it would drop: "
                             "rtlynx.sparsify before model.enable_parallelism / other diffusers hooks")
    for name in names:
        lin = layer_at(module, name)
        if name in shards:
            lin = shard.localize(lin)
        layer = SparseActLinear(lin, lora_rank=lora_rank, settings=settings)
        layer._tp = shards.get(name)
        _set_submodule(module, name, layer)
    for site in build_sites(module, names, site_rules(module, config)):
        hf.install_producer(module, site)
    module._rtlynx_settings = settings
    adapters.adopt(module)  # adapters added before sparsify: kept, on the sparse layers
    adapters.install(module)  # adapters added after: see rtlynx.integrations.peft
    hf.install_save_refusal(module)
    hf.install_parallelism(module, enable_parallelism)
    schedule.install(module, sparse_layers(module).values(), config.dense_below_t, config.dense_above_t)


def enable_parallelism(self, *, config, cp_plan=None):
    """diffusers' ``enable_parallelism`` for a sparsified model. Context parallelism: diffusers' own (the sparse
    layers need nothing). Tensor parallelism: every sparse layer's split is checked first (nothing changes on an
    error), then the model is un-sparsified, sharded by diffusers and sparsified again (see :mod:`rtlynx.parallel`)."""
    base = type(self).enable_parallelism
    tp = hf.tp_config(config)
    if tp is None or getattr(self, "_tp_plan", None) is None or getattr(self, "_parallel_config", None) is not None:
        return base(self, config=config, cp_plan=cp_plan)  # CP, or diffusers' own error
    size = tp.mesh.size() if tp.mesh is not None else tp.tp_degree
    cfg = config_of(self)
    layers = sparse_layers(self)
    cuda = any(l.weight.is_cuda for l in layers.values())
    for name, spec in shard.plan_specs(self, size).items():
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in layers:
            shard.check_split(layer, shard.split_style(spec[0]), spec[1], size, cfg, cuda)
    state = {n: (l.lora_rank if l.lora_A is not None else 0, l._override.copy(),
                 None if l.lora_A is None else (l.lora_A.detach().clone(), l.lora_B.detach().clone()))
             for n, l in layers.items()}
    unsparsify(self)

    def restore():
        _apply(self, list(state), cfg, lora_rank=0)
        for name, layer in sparse_layers(self).items():
            rank, override, lora = state[name]
            layer._override.update(override)
            if not rank:
                continue
            a, b = lora
            sh = layer._tp
            if sh is not None:  # rank 0's LoRA, as diffusers makes rank 0's weights the sharded ones
                src = dist.get_global_rank(sh.group, 0)
                dist.broadcast(a, src, group=sh.group)
                dist.broadcast(b, src, group=sh.group)
                a = sh.local(a, 1) if sh.style == "rowwise" else a
                b = sh.local(b, 0) if sh.style == "colwise" else b
            layer.add_lora(rank, rebuild=False)
            with torch.no_grad():
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
        for site in model_sites(self):
            site.refresh_overrides()
            site.build()

    try:
        base(self, config=config, cp_plan=cp_plan)
    except BaseException:
        if not shard.is_sharded(self):
            restore()  # diffusers refused before sharding anything: the model as it was
        raise
    restore()


def sparse_layers(model) -> dict[str, SparseActLinear]:
    """name -> SparseActLinear for every sparsified layer of ``model`` (a layer wrapped by a user's adapter under its
    own name, the same with and without the adapter)."""
    return dict(_layers_of(_as_module(model), SparseActLinear))


def unsparsify(model):
    """Undo :func:`sparsify`: put plain nn.Linear layers (same weight/bias objects) back; LoRA is dropped."""
    module = _as_module(model)
    if any(l._tp is not None for l in sparse_layers(module).values()):
        shard.refuse_sharded(module, "rtlynx.unsparsify")
    hf.uninstall_parallelism(module)
    adapters.uninstall(module)
    hf.uninstall_save_refusal(module)
    adapters.release(module)
    schedule.remove(module, sparse_layers(module).values())
    hf.remove_producers(module)
    for site in model_sites(module):
        site.release()
    for name, layer in sparse_layers(module).items():
        _set_submodule(module, name, layer.to_linear())
    if hasattr(module, "_rtlynx_settings"):
        del module._rtlynx_settings
    return model


_UNSET = object()


def configure(model, mode: str | None = None, compensation: str | None = None, lora: bool | None = None,
              backend: str | None = None, dense_below_t=_UNSET, dense_above_t=_UNSET, speed_rules: bool | None = None,
              dtype: str | None = None, keep_dense_weights: bool | None = None,
              adapter_rank: int | str | None = None, centre=_UNSET):
    """Change the settings of a sparsified model at once, without rebuilding: ``mode`` "sparse" / "dense" /
    "weight" (magnitude N:M on W, a baseline), ``compensation`` "none" / "norm", ``lora`` on/off, ``backend``,
    ``dense_below_t`` the final-steps schedule (a float, or None for sparse at every step), ``dense_above_t`` the
    first-steps one (the same), ``speed_rules``,
    ``dtype`` "native" / "fp8", ``keep_dense_weights`` (with "fp8": keep the bf16 weights next to the FP8 ones;
    set it before switching to "fp8" when exact dense runs must follow, e.g. an A/B against dense),
    ``adapter_rank`` the room for your own adapters in the LoRA tail ("auto", R, 0: see SparsityConfig; the sites
    whose room changes are rebuilt), ``centre`` None / "token_mean" (a LoRA calibrated with the other setting
    then fits worse).

    The model's one SparsityConfig is replaced (so ``save`` writes what runs), and per-layer overrides of the
    changed settings are dropped."""
    module = _as_module(model)
    layers = sparse_layers(module)
    settings = settings_of(module)
    if not layers or settings is None:
        raise ValueError("model has no SparseActLinear layers; call rtlynx.sparsify first")
    changes = {k: v for k, v in (("mode", mode), ("compensation", compensation), ("lora", lora),
                                 ("backend", backend), ("speed_rules", speed_rules), ("dtype", dtype),
                                 ("keep_dense_weights", keep_dense_weights), ("adapter_rank", adapter_rank))
               if v is not None}
    for name, value in (("dense_below_t", dense_below_t), ("dense_above_t", dense_above_t), ("centre", centre)):
        if value is not _UNSET:
            changes[name] = value
    config = dataclasses.replace(settings.config, **changes)  # validates everything before anything changes
    with transaction(module, extra=[settings, *model_sites(module)]):
        settings.config = config
        if "dense_below_t" in changes or "dense_above_t" in changes:
            schedule.install(module, layers.values(), config.dense_below_t, config.dense_above_t)
        dropped = {name for name, field in OVERRIDABLE.items() if field in changes}
        for layer in layers.values():
            for name in dropped:
                layer._override.pop(name, None)
        for site in model_sites(module):
            site.refresh_overrides()
        if "adapter_rank" in changes:
            adapters.refresh(module)  # sites whose room for the user's adapters changes are rebuilt
    return model


@contextlib.contextmanager
def dense_mode(model):
    """Run the model dense inside the block (A/B comparisons), restoring the settings after."""
    module = _as_module(model)
    settings = settings_of(module)
    layers = sparse_layers(module)
    if settings is None:  # layers sparsified one by one: switch each
        saved = {n: l._override.get("mode") for n, l in layers.items()}
        try:
            for layer in layers.values():
                layer.mode = "dense"
            yield model
        finally:
            for n, layer in layers.items():
                if saved[n] is None:
                    del layer.mode
                else:
                    layer.mode = saved[n]
        return
    saved_config = settings.config
    saved_overrides = {n: l._override.pop("mode", None) for n, l in layers.items()}
    try:
        settings.config = dataclasses.replace(saved_config, mode="dense")
        yield model
    finally:
        settings.config = saved_config
        for n, layer in layers.items():
            if saved_overrides[n] is not None:
                layer._override["mode"] = saved_overrides[n]


@dataclass
class LayerInfo:
    name: str
    in_features: int
    out_features: int
    rows: int | None
    sparse: bool
    flops: float
    site: str = ""           # the activation site (its parent module) for a sparse layer
    note: str = ""           # why a sparse layer may run dense on the GPU kernels (speed rules)


@dataclass
class Summary:
    layers: list[LayerInfo]
    flops_measured: bool
    dense_below_t: float | None = None
    dtype: str = "native"
    dense_above_t: float | None = None
    fp8_stored: int = 0      # sparse layers whose weights are held in FP8 only (dtype="fp8", keep_dense_weights off)

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
                         f"{'-' if l.rows is None else l.rows:>6}  {'yes' if l.sparse else 'no'}"
                         + (f"  [site {l.site}]" if l.site else "") + (f"  ({l.note})" if l.note else ""))
        lines.append(f"{n_sparse}/{len(self.layers)} linear layers sparse, covering "
                     f"{100 * self.sparse_flop_share:.1f}% of linear FLOPs ({basis})")
        if self.dense_below_t is not None:
            lines.append(f"sparse layers run dense on the final steps (noise level t < {self.dense_below_t})")
        if self.dense_above_t is not None:
            lines.append(f"sparse layers run dense on the first steps (noise level t > {self.dense_above_t})")
        if self.dtype == "fp8":
            lines.append("kept activations and weights in FP8 e4m3 (per-token / per-channel scales): FP8 sparse "
                         "kernels on sm_90 for bf16 sites, emulated on the reference path elsewhere")
            if self.fp8_stored:
                lines.append(f"{self.fp8_stored} sparse layers hold their weights in FP8 only (the bf16 copy was "
                             "dropped: keep_dense_weights=False)")
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
    config = config_of(module)
    infos = []
    for n, m in linears.items():
        r = rows.get(n) if rows else None
        flops = 2.0 * m.in_features * m.out_features * (r if r is not None else (0 if rows else 1))
        site, note = "", ""
        if isinstance(m, SparseActLinear):
            st = m._site
            site = f"{st.name or '(root)'}: {len(st.layers)} layer{'s' if len(st.layers) > 1 else ''}" + (
                f", {st.producer} producer" if st.producer != "plain" else "")
            if m._settings.config.speed_rules:
                reason = st.slow_reason
                if reason is None and r is not None and r <= SPEED_RULES["max_dense_tokens"]:
                    reason = f"M={r} <= {SPEED_RULES['max_dense_tokens']}"
                if reason:
                    note = f"dense on the GPU kernels by the speed rules: {reason}"
            if m._tp is not None:
                note = "; ".join(filter(None, (note, f"tensor-parallel {m._tp.style} shard of {m._tp.size}")))
        infos.append(LayerInfo(n, m.in_features, m.out_features, r, isinstance(m, SparseActLinear), flops, site, note))
    stored = sum(isinstance(m, SparseActLinear) and m.weight_scale is not None for m in linears.values())
    return Summary(infos, flops_measured=bool(rows), dense_below_t=config.dense_below_t if config else None,
                   dense_above_t=config.dense_above_t if config else None,
                   dtype=config.dtype if config else "native", fp8_stored=stored)
