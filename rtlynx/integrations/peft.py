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

peft is optional: only a model that carries adapters needs it (a model without peft installed has no PEFT layers).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..nn import SparseActLinear
from ..reference.fp8 import quantize_rows_e4m3
from ..sites.grouping import adapter_wrapper

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
            return self

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
            scale folded into its B columns: ``sum_u scale_u (x A_u^T) B_u^T == (x A^T) B^T``. What the GPU
            kernels' LoRA tail takes next to the compensation LoRA (rtlynx.sites.operand); None without one."""
            if self.disable_adapters or self.merged:
                return None
            names = [n for n in self.active_adapters if n in self.lora_A and n not in self.lora_variant]
            if not names:
                return None
            a = torch.cat([self.lora_A[n].weight for n in names], 0)
            b = torch.cat([self.lora_B[n].weight * self.scaling[n] for n in names], 1)
            return a, b
else:
    SparseLoraLinear = None


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


def release(module: nn.Module) -> None:
    """Undo :func:`adopt` (unsparsify: the wrappers hold nn.Linear layers again)."""
    for w in wrappers(module).values():
        if SparseLoraLinear is not None and type(w) is SparseLoraLinear:
            w.__class__ = _PeftLoraLinear


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
    if kwargs.get("hotswap"):
        return type(self).load_lora_adapter(self, pretrained_model_name_or_path_or_dict, *args, **kwargs)
    if kwargs.get("adapter_name") is None:
        from diffusers.utils.peft_utils import get_adapter_name  # diffusers is loaded: self is its model

        kwargs["adapter_name"] = get_adapter_name(self)
    return _injecting(self, "load_lora_adapter", kwargs["adapter_name"], pretrained_model_name_or_path_or_dict,
                      *args, **kwargs)


_METHODS = {"add_adapter": _add_adapter, "load_lora_adapter": _load_lora_adapter}


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


__all__ = ["SparseLoraLinear", "adopt", "has_adapters", "install", "release", "uninstall", "wrappers"]
