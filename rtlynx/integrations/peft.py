"""Users' own LoRA adapters (diffusers / PEFT) on a sparsified model.

PEFT keeps the adapter bookkeeping (names, ranks, scales, ``set_adapters``, enable / disable, fuse / unfuse, delete,
hotswap): its LoRA layer wraps a :class:`~rtlynx.nn.SparseActLinear` as ``base_layer``, at the layer's own name, as it
wraps an nn.Linear. The adapter runs on the dense x next to the sparse product and the compensation LoRA:
``y = s * (prune(x) W^T) + b + (x A_c^T) B_c^T + sum_u scale_u * (x A_u^T) B_u^T``.

- Adapters added before ``rtlynx.sparsify``: the wrapped nn.Linear (``wrapper.base_layer``) is sparsified in place and
  the wrapper kept (:func:`adopt` makes it a :class:`SparseLoraLinear`); the layer keeps the name it has without the
  adapter, so a model with and without adapters has the same sparse layers.
- Adapters added after: PEFT's dispatcher knows no SparseActLinear, and ``LoraConfig._register_custom_module`` (PEFT's
  extension point for custom layers) cannot reach the LoraConfig that diffusers' ``load_lora_adapter`` builds
  internally. So a sparsified model's ``add_adapter`` / ``load_lora_adapter`` (:func:`install`) first wrap each bare
  sparse layer in an empty SparseLoraLinear; PEFT then takes its own path for a layer that already holds LoRA
  adapters (``update_layer``) on the layers it targets, and the wrappers it left empty are taken off again.
- Fusing (``fuse_lora`` -> :meth:`SparseLoraLinear.merge`) writes into the site's operand; weights stored in FP8 are
  dequantised, changed and re-quantised per channel (unfusing gives them back within FP8 rounding).
- Where the adapters run: on the lynx site kernels (bf16 and FP8) they ride in the GEMM's LoRA tail next to the
  compensation LoRA (:mod:`rtlynx.sites.adapters`: the wrapper is its layer's *source*, its forward then skips PEFT's
  GEMMs); everywhere else (dense mode, the reference and cuSPARSELt paths, the speed rules' dense calls, gradients
  wanted for the adapters, DoRA / LoRA bias / active dropout) PEFT's own GEMMs run after the sparse layer. Every PEFT
  call that changes adapters (set_adapter / set_scale / scale / enable / delete / update_layer / merge / train, a
  state_dict load) and diffusers' load / hotswap / unload refill the tail in place (:func:`refresh`); an eager call
  also notices an in-place edit of a factor (version counters).

peft is optional: only a model that carries adapters needs it (a model without peft installed has no PEFT layers).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn

from ..nn import SparseActLinear
from ..reference.fp8 import quantize_rows_e4m3
from ..sites import adapters as tail
from ..sites.grouping import adapter_wrapper, model_sites

try:  # optional dependency: needed only once a user adds an adapter (then peft is what added it)
    from peft.tuners.lora import Linear as _PeftLoraLinear
    from peft.tuners.lora import LoraLayer as _LoraLayer
except ImportError:
    _PeftLoraLinear = _LoraLayer = None


if _PeftLoraLinear is not None:
    class SparseLoraLinear(_PeftLoraLinear):
        """peft's ``lora.Linear`` around a SparseActLinear: the same adapters, forward, scales and state_dict keys;
        merge / unmerge go through the site's operand (FP8-stored weights re-quantised)."""

        @classmethod
        def empty(cls, layer: SparseActLinear, adapter_name: str) -> "SparseLoraLinear":
            """A wrapper holding no adapter yet (PEFT adds ``adapter_name`` to it with ``update_layer``)."""
            self = cls.__new__(cls)
            nn.Module.__init__(self)
            _LoraLayer.__init__(self, layer)
            self.fan_in_fan_out = False
            self.is_target_conv_1d_layer = False
            self._active_adapter = adapter_name  # as peft's own Linear.__init__ sets it for its first adapter
            self.register_load_state_dict_post_hook(_reloaded)
            return self

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            """PEFT's forward, except where the adapters ride in the site kernels' LoRA tail: then the sparse layer
            alone (rtlynx.sites.adapters)."""
            base = self.base_layer
            if not torch.compiler.is_compiling():  # eager: the tail still holds these adapters
                if tail.source(base) is not self and self.lora_A:
                    tail.attach(base, self)
                tail.sync(base._site, [base._slot])
            if not args and not kwargs and tail.carries(base._site, base, x.reshape(-1, x.shape[-1])):
                return base(x, user_tail=True)
            return super().forward(x, *args, **kwargs)

        def _tail_names(self) -> list[str] | None:
            """The active adapters, [] if none; None if one cannot ride in the tail (a LoRA variant such as DoRA, a
            LoRA bias, dropout while training): PEFT runs them all."""
            if self.disable_adapters or self.merged:
                return []
            names = [n for n in self.active_adapters if n in self.lora_A]
            if any(self.lora_A[n].weight.is_meta or self.lora_B[n].weight.is_meta for n in names):
                return []  # diffusers' low_cpu_mem_usage load: no values yet (its load refills, _load_lora_adapter)
            for n in names:
                drop = self.lora_dropout[n]
                if n in self.lora_variant or self.lora_bias.get(n) or (drop.training and getattr(drop, "p", 0) > 0):
                    return None
            return names

        def tail_need(self) -> tuple[bool, int]:
            """(whether this layer holds adapters, the summed rank of those that would ride in the tail now)."""
            return bool(self.lora_A), sum(self.lora_A[n].weight.shape[0] for n in self._tail_names() or ())

        def tail_requires_grad(self) -> bool:
            return any(m[n].weight.requires_grad for n in self._tail_names() or () for m in (self.lora_A, self.lora_B))

        def tail_signature(self) -> tuple:
            """Changes with anything :meth:`tail_factors` depends on (version counters, not values: cheap)."""
            ps = [m.weight for d in (self.lora_A, self.lora_B) for m in d.values()]
            sc = tuple(_stamp(v) if isinstance(v, torch.Tensor) else v for v in self.scaling.values())
            return (self.training, self._disable_adapters, tuple(self.active_adapters), len(self.merged_adapters),
                    sc, tuple(_stamp(p) for p in ps))

        def _tail_changed(self) -> None:
            if _deferred[0]:  # inside a diffusers call that refreshes the whole model once at its end
                return
            base = self.get_base_layer()
            if self.lora_A:
                tail.attach(base, self)
            else:
                tail.detach(base)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features  # peft's generic lookup warns for a layer it does not know

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            base = self.get_base_layer()
            if base.weight_scale is None:
                super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            else:
                from peft.tuners.tuners_utils import check_adapters_to_merge  # peft is loaded: self is its layer

                for name in check_adapters_to_merge(self, adapter_names):
                    if name in self.lora_A:
                        self._requantize(base, name, +1, safe_merge)
                        self.merged_adapters.append(name)
            _rebuilt(base)

        def unmerge(self) -> None:
            base = self.get_base_layer()
            if base.weight_scale is None:
                super().unmerge()
            else:
                while self.merged_adapters:
                    name = self.merged_adapters.pop()
                    if name in self.lora_A:
                        self._requantize(base, name, -1, False)
            _rebuilt(base)

        def _requantize(self, base: SparseActLinear, name: str, sign: int, safe: bool) -> None:
            """``W +/-= delta`` on a weight stored in FP8: dequantised, changed in float32, quantised per channel
            again, written in place into the site's FP8 operand (``weight`` / ``weight_scale`` view it)."""
            with torch.no_grad():
                w = base._dequantized().float() + sign * self.get_delta_weight(name).float()
                if safe and not torch.isfinite(w).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                q, s = quantize_rows_e4m3(w)
                base.weight.copy_(q)
                base.weight_scale.copy_(s)
                if self.lora_bias[name]:
                    base.bias.add_(sign * self.lora_B[name].bias * self.scaling[name])

        def tail_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
            """The active, unmerged adapters as one low-rank pair ``(A [r_u, K], B [N, r_u])`` with each adapter's
            scale folded into its A rows: ``sum_u scale_u (x A_u^T) B_u^T == (x A^T) B^T``. What the site kernels'
            LoRA tail takes next to the compensation LoRA (rtlynx.sites.adapters); None without one (or with one
            that cannot ride there)."""
            names = self._tail_names()
            if not names:
                return None
            a = torch.cat([self.lora_A[n].weight * self.scaling[n] for n in names], 0)
            b = torch.cat([self.lora_B[n].weight for n in names], 1)
            return a, b

    def _refilling(name: str):
        def method(self, *args, **kwargs):
            out = getattr(_PeftLoraLinear, name)(self, *args, **kwargs)
            self._tail_changed()
            return out

        method.__name__ = method.__qualname__ = name
        method.__doc__ = f"PEFT's ``{name}``, then the adapters in the LoRA tail refilled (rtlynx.sites.adapters)."
        return method

    # PEFT's calls that change which adapters run, or their scales (diffusers' set_adapters / enable_lora /
    # disable_lora / delete_adapters / fuse_lora go through them)
    for _name in ("update_layer", "set_adapter", "set_scale", "scale_layer", "unscale_layer", "enable_adapters",
                  "delete_adapter", "train"):
        setattr(SparseLoraLinear, _name, _refilling(_name))
else:
    SparseLoraLinear = None


_deferred = [0]  # > 0 while a diffusers call runs whose end refreshes every site once (one rebuild, not one per layer)


@contextlib.contextmanager
def _refreshed(module):
    _deferred[0] += 1
    try:
        yield
    finally:
        _deferred[0] -= 1
        refresh(module)


def _stamp(t: torch.Tensor) -> tuple[int, int, bool]:
    """What changes when a tensor is written in place or replaced (inference tensors keep no version counter)."""
    return (-1 if t.is_inference() else t._version), t.data_ptr(), t.requires_grad


def _reloaded(module, incompatible_keys) -> None:
    """load_state_dict post hook of a SparseLoraLinear (set_peft_model_state_dict writes the factors in place)."""
    if SparseLoraLinear is not None and isinstance(module, SparseLoraLinear):
        module._tail_changed()


def refresh(module) -> None:
    """Bring the LoRA tails of a sparsified model (or pipeline) up to date with its adapters: every sparse layer's
    source is the SparseLoraLinear wrapping it now (none where PEFT unloaded it); each site is rebuilt where a
    member's room changes, refilled in place otherwise. The diffusers / PEFT calls do this themselves; call it after
    editing adapter factors in place while only a torch.compiled model runs (an eager call notices such an edit)."""
    module = module if isinstance(module, nn.Module) else module.transformer
    by_layer = {id(w.base_layer): w for w in wrappers(module).values()
                if SparseLoraLinear is not None and isinstance(w, SparseLoraLinear) and w.lora_A}
    for site in model_sites(module):
        tail.update(site, [by_layer.get(id(layer)) for layer in site.layers])


def _rebuilt(base) -> None:
    """The site rebuilds its operand (and derived formats: an FP8 copy, a pruned-weight cache) after a weight changed
    in place."""
    base._weight_cache = None
    if isinstance(base, SparseActLinear):
        base._site.build()


def wrappers(module: nn.Module) -> dict[str, nn.Module]:
    """name -> PEFT layer wrapping a sparse layer of ``module``."""
    return {n: m for n, m in module.named_modules() if adapter_wrapper(m) and isinstance(m.base_layer, SparseActLinear)}


def adopt(module: nn.Module) -> None:
    """PEFT's own LoRA Linear wrappers of sparse layers (adapters added before sparsify) become SparseLoraLinear (the
    same object and state: the subclass adds methods only)."""
    if SparseLoraLinear is None:
        return
    for w in wrappers(module).values():
        if type(w) is _PeftLoraLinear:
            w.__class__ = SparseLoraLinear
            w.register_load_state_dict_post_hook(_reloaded)
    refresh(module)


def release(module: nn.Module) -> None:
    """Undo :func:`adopt` (unsparsify: the wrappers hold nn.Linear layers again)."""
    for w in wrappers(module).values():
        w.base_layer.__dict__.pop(tail.SOURCE, None)
        if SparseLoraLinear is not None and type(w) is SparseLoraLinear:
            w.__class__ = _PeftLoraLinear
            hooks = w._load_state_dict_post_hooks
            for key in [k for k, h in hooks.items() if h is _reloaded]:
                del hooks[key]


def _wrap_bare(module: nn.Module, adapter_name: str) -> list[tuple[nn.Module, str, SparseActLinear]]:
    """Wrap every sparse layer not yet inside a PEFT layer in an empty SparseLoraLinear; ``[(parent, attribute,
    layer)]`` of the wrapped ones."""
    if SparseLoraLinear is None:
        raise ImportError("adapters on a sparsified model need peft: pip install peft")
    done = []
    for parent in list(module.modules()):
        if adapter_wrapper(parent):
            continue
        for attr, child in list(parent._modules.items()):
            if isinstance(child, SparseActLinear):
                setattr(parent, attr, SparseLoraLinear.empty(child, adapter_name))
                done.append((parent, attr, child))
    return done


def _unwrap_empty(done) -> None:
    for parent, attr, layer in done:
        w = parent._modules[attr]
        if isinstance(w, SparseLoraLinear) and w.get_base_layer() is layer and not w.lora_A:
            setattr(parent, attr, layer)


def _injecting(self, method: str, adapter_name: str, /, *args, **kwargs):
    with _refreshed(self):
        done = _wrap_bare(self, adapter_name)
        try:
            return getattr(type(self), method)(self, *args, **kwargs)
        finally:
            _unwrap_empty(done)


def _add_adapter(self, adapter_config, adapter_name: str = "default"):
    """diffusers' ``add_adapter`` for a sparsified model (see the module docstring)."""
    return _injecting(self, "add_adapter", adapter_name, adapter_config, adapter_name)


def _load_lora_adapter(self, pretrained_model_name_or_path_or_dict, *args, **kwargs):
    """diffusers' ``load_lora_adapter`` for a sparsified model (see the module docstring); a hotswap replaces the
    weights of wrappers that exist already."""
    if kwargs.get("hotswap"):  # PEFT writes the new factors through .data (no version counter moves): refill
        with _refreshed(self):
            return type(self).load_lora_adapter(self, pretrained_model_name_or_path_or_dict, *args, **kwargs)
    if kwargs.get("adapter_name") is None:
        from diffusers.utils.peft_utils import get_adapter_name  # diffusers is loaded: self is its model

        kwargs["adapter_name"] = get_adapter_name(self)
    return _injecting(self, "load_lora_adapter", kwargs["adapter_name"], pretrained_model_name_or_path_or_dict,
                      *args, **kwargs)


def _unload_lora(self):
    """diffusers' ``unload_lora`` (``pipe.unload_lora_weights``): the sparse layers are bare again, their tail
    rows go."""
    with _refreshed(self):
        return type(self).unload_lora(self)


_METHODS = {"add_adapter": _add_adapter, "load_lora_adapter": _load_lora_adapter, "unload_lora": _unload_lora}


def install(module: nn.Module) -> None:
    """Route the model's adapter injection through :func:`_injecting` (sparsify calls this; diffusers offers no hook
    around the LoraConfig it builds, so these are attributes of the instance, as functools.partial so it pickles)."""
    for name, fn in _METHODS.items():
        if callable(getattr(type(module), name, None)):
            setattr(module, name, functools.partial(fn, module))


def uninstall(module: nn.Module) -> None:
    for name in _METHODS:
        module.__dict__.pop(name, None)


def has_adapters(module: nn.Module) -> bool:
    """Whether a PEFT adapter wraps any layer of ``module``."""
    return any(adapter_wrapper(m) for m in module.modules())


__all__ = ["SparseLoraLinear", "adopt", "has_adapters", "install", "refresh", "release", "uninstall", "wrappers"]
