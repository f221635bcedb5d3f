"""SparseActLinear: a drop-in for nn.Linear whose input is pruned to N:M online, every forward."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, reference
from .config import BACKENDS, COMPENSATIONS, K_REMAINDER, MODES, SparsityConfig
from .families import family_of
from .reference.fp8 import dequantize, quantize_rows_e4m3
from .sites import Settings, Site

CHOICES = {"mode": MODES, "compensation": COMPENSATIONS, "backend": BACKENDS, "k_remainder": K_REMAINDER}
# Settings a layer can override for itself (ablations: one layer dense, one without compensation...); by default
# every layer reads the model's one SparsityConfig.
OVERRIDABLE = {"mode": "mode", "compensation": "compensation", "backend": "backend", "lora_enabled": "lora",
               "k_remainder": "k_remainder"}


def check_choice(name: str, value) -> None:
    if name == "lora_enabled":
        if not isinstance(value, bool):
            raise ValueError(f"lora_enabled must be a bool, got {value!r}")
        return
    if value not in CHOICES[name]:
        raise ValueError(f"{name} must be one of {CHOICES[name]}, got {value!r}")


def _setting(name: str) -> property:
    """A setting read from the model's one SparsityConfig unless this layer overrides it (checked when set, so a
    typo fails at once and forward() checks nothing). ``del layer.<name>`` drops the override."""
    field = OVERRIDABLE[name]

    def get(self):
        o = self._override
        return o[name] if name in o else getattr(self._settings.config, field)

    def set(self, value):
        check_choice(name, value)
        self._override[name] = value
        self._site.refresh_overrides()

    def delete(self):
        self._override.pop(name, None)
        self._site.refresh_overrides()

    return property(get, set, delete)


def _config_field(name: str) -> property:
    return property(lambda self: getattr(self._settings.config, name))


class SparseActLinear(nn.Module):
    """``y = s * (prune_nm(x) @ W^T) + b + (x @ A^T) @ B^T``, reusing the wrapped Linear's parameters.

    - ``weight`` / ``bias`` are the original ``nn.Parameter`` objects, so the original state_dict keys stay valid
      and training / loading the base model still reaches them. Inside a model, :mod:`rtlynx.sites` points them at
      views of their site's concatenated GEMM operand (no second copy).
    - Settings (pattern, compensation, backend, mode, LoRA on/off, ...) are read from one shared
      :class:`rtlynx.sites.Settings`; a standalone layer gets its own. ``layer.mode = "dense"`` (or
      ``compensation``, ``backend``, ``lora_enabled``) overrides one layer, for ablations.
    - ``compensation="norm"``: s is the per-token norm scale; ``"none"``: s = 1.
    - ``lora_rank > 0`` adds ``lora_A [r, K]`` / ``lora_B [N, r]`` on the dense x; ``lora_B`` starts at
      zero so a fresh layer equals the norm-compensated one.
    - ``mode``: "sparse" (default), "dense" (exactly the original Linear, for A/B runs without
      rebuilding), "weight" (baseline: magnitude N:M on W instead of on x).
    - K not a multiple of m: ``k_remainder="pad"`` zero-pads the last group, ``"dense"`` runs the
      layer dense; either way a one-time warning says so.
    - ``dtype="fp8"`` on the FP8 kernels (unless ``keep_dense_weights``): ``weight`` holds the float8_e4m3fn weight
      and the buffer ``weight_scale [N]`` its per-channel scales (``W ~= weight * weight_scale[:, None]``);
      :meth:`dense_weight` gives the dequantised weight in :attr:`compute_dtype`.
    """

    mode = _setting("mode")
    compensation = _setting("compensation")
    backend = _setting("backend")
    lora_enabled = _setting("lora_enabled")
    n = _config_field("n")
    m = _config_field("m")
    eps = _config_field("eps")
    k_remainder = _setting("k_remainder")

    def __init__(self, linear: nn.Linear, n: int = 2, m: int = 4, compensation: str = "norm",
                 lora_rank: int = 0, backend: str = "auto", k_remainder: str = "pad", eps: float = 1e-8,
                 speed_rules: bool = True, settings: Settings | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseActLinear wraps an nn.Linear, got {type(linear).__name__}")
        reference.check_pattern(n, m)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("weight_scale", None)  # set while the weight is stored in FP8 (rtlynx.sites)
        self._dense_dtype = linear.weight.dtype     # the dtype the layer computes in while its weight is FP8
        if settings is None:  # a standalone layer: its own settings
            settings = Settings(SparsityConfig(n=n, m=m, compensation=compensation, backend=backend,
                                               k_remainder=k_remainder, eps=eps, lora_rank=lora_rank,
                                               speed_rules=speed_rules))
        self._settings = settings
        self._override: dict = {}
        self.lora_rank = 0
        self.lora_A = self.lora_B = None
        self._weight_cache = None
        self._step_gate = None  # rtlynx.schedule: dense on the final sampling steps when set
        self._site = None
        self._tp = None  # rtlynx.parallel.Shard when tensor parallelism split this layer (set by rtlynx.sparsify)
        for key, value in vars(linear).items():  # diffusers' tensor-parallel plan data (packed blocks) stays readable
            if key.startswith("_tp_"):
                setattr(self, key, value)
        if lora_rank:
            self.add_lora(lora_rank, rebuild=False)
        Site([self], "plain", "")  # a site of its own until rtlynx.sites groups it with others

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("weight", "bias", "lora_A", "lora_B"):
            site = self.__dict__.get("_site")
            if site is not None:
                site._dirty = True  # a parameter object replaced: the site rebuilds its operand before the next call

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the layer's inputs and outputs (the weight's, or the original one while it is FP8)."""
        return self._dense_dtype if self.weight_scale is not None else self.weight.dtype

    def dense_weight(self) -> torch.Tensor:
        """The weight in :attr:`compute_dtype`: the parameter itself, or its FP8 storage dequantised."""
        if self.weight_scale is None:
            return self.weight
        backends.warn_once("fp8-dense-weight", "rtlynx: a dense product on weights stored in FP8 uses their "
                                               "dequantised values, not the original weights (keep_dense_weights="
                                               "True keeps those, for exact dense runs)")
        return self._dequantized()

    def _dequantized(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``weight * scale`` (default: ``weight_scale``) in float32, rounded once to the dtype the layer computes in
        (the weight's own dtype once a cast has turned the FP8 values into plain numbers)."""
        scale = self.weight_scale if scale is None else scale
        dtype = self._dense_dtype if self.weight.dtype == torch.float8_e4m3fn else self.weight.dtype
        return dequantize(self.weight, scale.to(self.weight.device).float()).to(dtype)

    def _apply(self, fn, recurse=True):
        scale = self.weight_scale  # float32, before fn touches it
        out = super()._apply(fn, recurse)
        if scale is not None and self.weight.dtype != torch.float8_e4m3fn:
            # a dtype cast (.half(), .to(float32)) turned the FP8 values into plain numbers: fold the scales in
            backends.warn_once("fp8-cast", "rtlynx: a dtype cast of a model whose weights are stored in FP8 "
                                           "dequantises them (the original weights were not kept: "
                                           "keep_dense_weights=False)")
            with torch.no_grad():
                self.weight.data = self._dequantized(scale)
            self.weight_scale = None
        if self._site is not None:
            self._site.member_applied(self)  # .to / .half moved the parameters off the site's operand
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key = prefix + "weight"
        w = state_dict.get(key)
        if self.weight_scale is not None and w is not None and w.dtype != torch.float8_e4m3fn:
            # base weights loaded into a layer that stores FP8 (e.g. a fine-tune's checkpoint): quantised as
            # sparsify does, instead of copy_ casting the values to e4m3 without a scale

            q, sw = quantize_rows_e4m3(w.to(self.weight_scale.device))
            state_dict = {**state_dict, key: q, prefix + "weight_scale": sw}
        super()._load_from_state_dict(state_dict, prefix, *args)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "SparseActLinear":
        return cls(linear, **kwargs)

    def add_lora(self, rank: int, rebuild: bool = True) -> None:
        """(Re)create the LoRA branch: A like nn.Linear's init, B = 0 (the layer output is unchanged)."""
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        dev, dt = self.weight.device, self.compute_dtype
        a = torch.empty(rank, self.in_features, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        self.lora_rank = rank
        if rebuild:
            self._site.build()  # the site's operand grows a tail for B

    def remove_lora(self, rebuild: bool = True) -> None:
        """Drop the LoRA branch (the site's operand loses its tail)."""
        self.lora_A = self.lora_B = None
        self.lora_rank = 0
        if rebuild:
            self._site.build()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"pattern={self.n}:{self.m}, compensation={self.compensation}, lora_rank={self.lora_rank}, "
                f"backend={self.backend}, mode={self.mode}")

    def to_linear(self) -> nn.Linear:
        """The plain nn.Linear holding this layer's (shared) weight and bias; the LoRA is dropped. A weight stored
        in FP8 must have been given back first (``Site.release``)."""
        if self.weight_scale is not None:
            raise RuntimeError("to_linear: the weight is stored in FP8; rtlynx.unsparsify dequantises it first")
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta", dtype=self.weight.dtype)
        lin.weight = self.weight
        lin.bias = self.bias
        for key, value in vars(self).items():
            if key.startswith("_tp_"):
                setattr(lin, key, value)
        return lin

    def _pruned_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._weight_cache is None or self._weight_cache[0] != key:
            wd = self.dense_weight().detach()
            wp = reference.prune_weight_magnitude(reference.pad_to_multiple(wd, self.m), self.n, self.m)
            self._weight_cache = (key, wp[:, : self.in_features])
        return self._weight_cache[1]

    def forward(self, x: torch.Tensor, *, user_tail: bool = False) -> torch.Tensor:
        """``user_tail``: for the PEFT layer wrapping this one (rtlynx.integrations.peft), whose adapters then ride
        in the site kernels' LoRA tail (rtlynx.sites.adapters) instead of running as its own GEMMs."""
        if not x.is_floating_point():
            raise TypeError(f"SparseActLinear needs a floating-point input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim {x.shape[-1]} != in_features {self.in_features}")
        if x.dtype != self.compute_dtype and not torch.is_autocast_enabled(x.device.type):
            # nn.Linear refuses this too; the backends would otherwise cast x or W silently
            raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {x.dtype} and {self.compute_dtype} "
                               "(SparseActLinear, like nn.Linear: cast the input or the layer)")
        return self._site.forward(self, x, user_tail)

    def _forward_remainder(self, x: torch.Tensor) -> torch.Tensor:
        k, m = self.in_features, self.m
        msg = f"K={k} is not a multiple of m={m}"
        if self.k_remainder == "dense":
            backends.warn_once(f"kdense:{k}:{m}", f"rtlynx: {msg}; running this layer dense")
            return F.linear(x, self.dense_weight(), self.bias)
        backends.warn_once(f"kpad:{k}:{m}", f"rtlynx: {msg}; zero-padding the last group")
        use_lora = self.lora_enabled and self.lora_A is not None
        lora_a, lora_b = (self.lora_A, self.lora_B) if use_lora else (None, None)
        y = self._forward_padded(x.reshape(-1, k), lora_a, lora_b)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _forward_padded(self, x2, lora_a, lora_b):
        # Zero columns in x and W change neither the kept set of full groups nor any dot product.
        xp = reference.pad_to_multiple(x2, self.m)
        wp = reference.pad_to_multiple(self.dense_weight(), self.m)
        ap = reference.pad_to_multiple(lora_a, self.m) if lora_a is not None else None
        return family_of(self._settings.config.dtype).run_backend(self.backend, xp, wp, self.bias, self.n, self.m,
                                                                   self.compensation, ap, lora_b, self.eps)


__all__ = ["CHOICES", "MODES", "OVERRIDABLE", "SparseActLinear", "check_choice"]
