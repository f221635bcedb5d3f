"""Activation sites: the unit rtlynx runs on.

A *site* is one producer (the input as given, or GELU-tanh of an MLP pre-activation) whose output x is pruned and
compressed **once**, and the sparse layers that read x (Q, K, V; FLUX's single-block Q, K, V and MLP up):

    y_cat = s * (prune(x) @ [W_1; ...; W_k]^T) + [b_1; ...; b_k] + (x [A_1; ...; A_k]^T) blockdiag(B_1, ..., B_k)^T

computed as one prune pass and one sparse GEMM per member on its rows of the concatenated operand, so that every
member's output is a contiguous tensor of its own (column views of one [M, N_cat] result cost more downstream
than the extra launches: benchmarks/NOTES.md, v8).

Memory: the site owns one GEMM operand ``wext [N_1 + ... + N_k, Kp + 2 rp] = [W_cat | 0 | B-expanded]``
(``rtlynx.reference.sm90.expand_lora_b``; rp = round_up(total LoRA rank, 64)) plus a bias and a LoRA-A buffer;
the layers' ``weight``, ``bias``, ``lora_A`` and ``lora_B`` parameters are re-pointed at views of them. No second
copy of a weight exists, and ``state_dict`` / ``load_state_dict`` / optimisers still see the original parameter
objects under their original names.

Dispatch: the layers stay the model's own modules, so the model's forward code is unchanged. On the lynx kernels
the first layer of a site called with a tensor x computes every member's output and hands the others theirs when
they are called with the same tensor object x. A site whose members are called
with different inputs (the shared result goes unused) is split, with a warning, into one GEMM per member on row
slices of the same operand. Every other backend (reference, cuSPARSELt, fallbacks) runs member by member, exactly
as a lone :class:`rtlynx.nn.SparseActLinear`.

Settings: a sparsified model holds exactly one :class:`rtlynx.config.SparsityConfig`, in one :class:`Settings`
object that its layers and sites share by reference (never copied).
"""

from __future__ import annotations

import fnmatch
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, parallel
from .presets import SPEED_RULES
from .reference.sm90 import round_up


class Settings:
    """The one :class:`~rtlynx.config.SparsityConfig` of a sparsified model (``.config``), shared by reference."""

    def __init__(self, config):
        self.config = config

    def __repr__(self) -> str:
        return f"Settings({self.config!r})"


def _repoint(param: torch.Tensor | None, view: torch.Tensor) -> None:
    """Make ``param`` (same object) an alias of ``view``: its storage becomes the site's buffer."""
    param.data = view


def _dequantize_member(layer) -> None:
    """A layer whose weight is stored in FP8 gets a dense weight of its own again (dequantised: the originals were
    not kept), with a one-time warning."""
    if layer.weight_scale is None:
        return
    backends.warn_once("fp8-dequantise", "rtlynx: the weights were stored in FP8 only (dtype='fp8', "
                                         "keep_dense_weights=False); going back to bf16 weights dequantises them "
                                         "(they are not the original weights)")
    with torch.no_grad():
        w = layer._dequantized().contiguous()
        _repoint(layer.weight, w)
        layer.weight.requires_grad_(getattr(layer, "_weight_grad", True))
        layer.weight_scale = None


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _version(x: torch.Tensor) -> int:
    """x's in-place modification counter (inference-mode tensors have none)."""
    return -1 if x.is_inference() else x._version


class Site:
    """One producer and the sparse layers that read its output (see the module docstring)."""

    def __init__(self, layers, producer: str = "plain", name: str = ""):
        layers = list(layers)
        if not layers:
            raise ValueError("a site needs at least one layer")
        k = layers[0].in_features
        if any(l.in_features != k for l in layers):
            raise ValueError(f"site {name!r}: its layers read inputs of different widths "
                             f"{[l.in_features for l in layers]}")
        self.layers = layers
        self.producer = producer
        self.name = name
        self.k = k
        self.n = sum(l.out_features for l in layers)
        for i, layer in enumerate(layers):
            layer._site, layer._slot = self, i
        self.tp = parallel.site_shard(layers, name)  # tensor-parallel split (rtlynx.parallel), None on one GPU
        self.row_parallel = self.tp is not None and self.tp.style == "rowwise"
        self._misses = 0
        self._split = False       # members read different inputs: one GEMM each
        # Why the speed rules keep this site dense on the GPU kernels (its shape alone), None if they do not.
        self.slow_reason = self._slow_reason()
        self.refresh_overrides()
        self.build()              # also sets the per-build state: _pending, _fast, _applied, _dirty, _weights

    # ------------------------------------------------------------------------------------------ storage
    def build(self) -> None:
        """(Re)build the site's operand from the layers' current parameters and re-point them at it."""
        ls = self.layers
        stored = [l.weight_scale is not None for l in ls]
        if any(stored) and not (all(stored) and len({l.weight.device for l in ls}) == 1):
            for l in ls:  # members stored in FP8 next to others that are not (or on other devices): all dense
                _dequantize_member(l)
            stored = [False]
        w0 = ls[0].weight
        dev, dt = w0.device, ls[0].compute_dtype
        tensors = [t for l in ls for t in (l.bias, l.lora_A, l.lora_B) if t is not None]
        tensors += [l.weight for l in ls if l.weight_scale is None]
        self.kp = kp = round_up(self.k, 128)
        ranks = [l.lora_rank if l.lora_A is not None else 0 for l in ls]
        self._ranks = tuple(ranks)
        self._lora_offs = tuple(sum(ranks[:i]) for i in range(len(ranks)))  # member i's rows of lora_a
        self.rank = sum(ranks)
        self.rp = rp = round_up(self.rank, 64) if self.rank else 0
        kg = kp + 2 * rp
        offs, o = [], 0
        for l in ls:
            offs.append(o)
            o += l.out_features
        self.slices = tuple(slice(a, a + l.out_features) for a, l in zip(offs, ls))
        self.splits = tuple(l.out_features for l in ls)
        self._pending = None      # (x, lora on, x version, per-member outputs, calls left)
        self._fp8 = None          # (wq, sw) of the FP8 kernels, made at their first use (fp8_operand)
        self._fp8_stored = all(stored)  # the layers' weights live in _fp8 (no bf16 copy: keep_dense_weights off)
        self._fast = None         # (config, device, dtype) of the last call that passed every fused-path check
        self._applied: set[int] = set()
        self._dirty = False
        self._weights = tuple(l.weight for l in ls)  # the parameter objects whose addresses ensure() checks
        self._wptrs = tuple(w.data_ptr() for w in self._weights)
        if any(t.device != dev or t.dtype != dt for t in tensors) or dev.type == "meta":
            # mixed devices / dtypes: no shared operand, every member runs on its own
            self.wext = self.bias = self.lora_a = self._wext_nolora = None
            return
        if self._fp8_stored:
            self._build_fp8_stored(dev)
            return
        with torch.no_grad():
            if len(ls) == 1 and kg == self.k and w0.is_contiguous():
                wext = w0.detach()  # the parameter itself is the GEMM operand: nothing to build
            else:
                wext = torch.zeros(self.n, kg, device=dev, dtype=dt)
                for l, sl in zip(ls, self.slices):
                    wext[sl, : self.k].copy_(l.weight)
                    _repoint(l.weight, wext[sl, : self.k])
            lora_a, bias = self._build_lora_a_bias(dev, dt)
            for l, sl, r, roff in zip(ls, self.slices, ranks, self._lora_offs):
                if r:
                    tail = wext[sl, kp + 2 * roff: kp + 2 * (roff + r): 2]  # B's column t at Kp + 2t
                    tail.copy_(l.lora_B)
                    _repoint(l.lora_B, tail)
        self.wext, self.bias, self.lora_a = wext, bias, lora_a
        self._wext_nolora = wext[:, :kp] if rp else wext  # the operand without its LoRA tail (row stride Kg)
        self._wptrs = tuple(w.data_ptr() for w in self._weights)  # re-pointed at the operand
        self._prepare_fp8()

    def _build_lora_a_bias(self, dev, dt):
        """The members' LoRA A stacked ``[rp, K]`` and biases concatenated ``[N]`` (None where there are none),
        the layers' parameters re-pointed at them."""
        ls = self.layers
        lora_a = None
        if self.rank:
            lora_a = torch.zeros(self.rp, self.k, device=dev, dtype=dt)
            for l, r, roff in zip(ls, self._ranks, self._lora_offs):
                if r:
                    lora_a[roff: roff + r].copy_(l.lora_A)
                    _repoint(l.lora_A, lora_a[roff: roff + r])
        bias = None
        if any(l.bias is not None for l in ls):
            if len(ls) == 1:
                bias = ls[0].bias.detach()
            else:
                bias = torch.zeros(self.n, device=dev, dtype=dt)
                for l, sl in zip(ls, self.slices):
                    if l.bias is not None:
                        bias[sl].copy_(l.bias)
                        _repoint(l.bias, bias[sl])
        return lora_a, bias

    def _build_fp8_stored(self, dev) -> None:
        """build() for members whose weights are stored in FP8: one ``wq [N, Kp]`` / ``sw [N]`` for the site (the
        FP8 kernels' operand), the layers' ``weight`` / ``weight_scale`` re-pointed at views of it; LoRA B stays
        in the layers' own tensors (the FP8 path adds h B^T after the GEMM)."""
        ls = self.layers
        with torch.no_grad():
            wq = torch.zeros(self.n, self.kp, device=dev, dtype=torch.uint8).view(torch.float8_e4m3fn)
            sw = torch.empty(self.n, device=dev, dtype=torch.float32)
            for l, sl in zip(ls, self.slices):
                wq[sl, : self.k].copy_(l.weight)
                sw[sl].copy_(l.weight_scale)
                _repoint(l.weight, wq[sl, : self.k])
                _repoint(l.weight_scale, sw[sl])
            self.lora_a, self.bias = self._build_lora_a_bias(dev, ls[0].compute_dtype)
        self.wext = self._wext_nolora = None
        self._fp8 = (wq, sw)
        self._wptrs = tuple(w.data_ptr() for w in self._weights)

    def _fp8_storable(self, cfg) -> bool:
        """Whether this site's calls run on the FP8 kernels (what storing its weights in FP8 only is for)."""
        w = self._wext_nolora
        return (w is not None and w.is_cuda and w.dtype == torch.bfloat16 and self.k <= 16384
                and all(self._kernels_ok(cfg, l.backend, w.device.index or 0) for l in self.layers)
                and not (cfg.speed_rules and self.slow_reason is not None))

    def _store_fp8(self) -> None:
        """Replace the bf16 weights by the FP8 operand (keep_dense_weights=False): the layers' ``weight`` become
        views of ``wq`` and ``weight_scale`` of ``sw``; the bf16 operand is freed."""
        wq, sw = self._fp8
        with torch.no_grad():
            for l, sl in zip(self.layers, self.slices):
                if l.lora_B is not None:  # off the bf16 operand's tail, which goes
                    _repoint(l.lora_B, l.lora_B.detach().clone())
                l._dense_dtype = l.weight.dtype
                l._weight_grad = l.weight.requires_grad
                _repoint(l.weight, wq[sl, : self.k])
                l.weight.requires_grad_(False)
                l.weight_scale = sw[sl]
        self.wext = self._wext_nolora = None
        self._fp8_stored = True
        self._wptrs = tuple(w.data_ptr() for w in self._weights)

    def restore_dense(self) -> None:
        """Give the members dense weights again, dequantised from FP8 (the originals were not kept), and rebuild."""
        if not self._fp8_stored:
            return
        for l in self.layers:
            _dequantize_member(l)
        self._fp8_stored = False
        self._fp8 = None
        self.build()

    def release(self) -> None:
        """Give every layer parameters that own their storage again (unsparsify; diffusers / safetensors saving
        refuse tensors that share storage)."""
        for l in self.layers:
            _dequantize_member(l)
        self._fp8_stored = False
        with torch.no_grad():
            for l in self.layers:
                for name in ("weight", "bias", "lora_A", "lora_B"):
                    p = getattr(l, name)
                    if p is not None and p.untyped_storage().nbytes() != p.numel() * p.element_size():
                        _repoint(p, p.detach().clone(memory_format=torch.contiguous_format))
        self.wext = self.bias = self.lora_a = self._wext_nolora = None
        self._pending = self._fp8 = None

    def member_applied(self, layer) -> None:
        """A member went through ``Module._apply`` (.to / .half / .cuda): rebuild once all of them have."""
        self._applied.add(id(layer))
        self._dirty = True
        if len(self._applied) == len(self.layers):
            self.build()

    def ensure(self) -> None:
        """Eager check that the operand still holds the layers' parameters, rebuilt if not: a parameter object
        replaced (``layer.weight = ...``, ``load_state_dict(assign=True)``) or moved (``.to``) marks the site dirty;
        a weight's ``.data`` re-pointed is seen here by its address (per call: a few pointer reads)."""
        if self._dirty or any(w.data_ptr() != p for w, p in zip(self._weights, self._wptrs)):
            self.build()

    def refresh_overrides(self) -> None:
        self._uniform = not any(l._override for l in self.layers)
        self._fast = None
        self._prepare_fp8()

    def _prepare_fp8(self) -> None:
        """Quantise the FP8 operand now (sparsify / configure / build), not at a first call that torch.compile may
        be tracing with fake tensors."""
        settings = getattr(self.layers[0], "_settings", None)
        if settings is None or not hasattr(self, "_fp8_stored"):
            return
        cfg = settings.config
        if self._fp8_stored and (cfg.dtype != "fp8" or cfg.keep_dense_weights):
            self.restore_dense()  # back to native (or asked to keep bf16 weights now): dequantised, with a warning
        if cfg.dtype != "fp8":
            self._fp8 = None  # configured back to native: free the FP8 copy
        elif getattr(self, "_wext_nolora", None) is not None and self._wext_nolora.is_cuda:
            self.fp8_operand()
            if not cfg.keep_dense_weights and self._fp8_storable(cfg):
                self._store_fp8()

    def _slow_reason(self) -> str | None:
        lim = SPEED_RULES["max_dense_features"]
        if self.k <= lim:
            return f"K={self.k} <= {lim}"
        if self.n <= lim:
            return f"N={self.n} <= {lim}"
        return None

    # ------------------------------------------------------------------------------------------ forward
    def _speed_dense(self, cfg, backend: str, x2: torch.Tensor) -> bool:
        return (cfg.speed_rules and x2.is_cuda and backend != "reference"
                and (self.slow_reason is not None or x2.shape[0] <= SPEED_RULES["max_dense_tokens"]))

    def _fusable(self, cfg, backend: str, x2: torch.Tensor) -> bool:
        if self._fp8_stored:  # the FP8 operand is all there is
            operand = cfg.dtype == "fp8" and x2.dtype == self.layers[0].compute_dtype
        else:
            operand = self.wext is not None and x2.dtype == self.wext.dtype
        return operand and x2.is_cuda and self._kernels_ok(cfg, backend, backends._device_index(x2))

    def _kernels_ok(self, cfg, backend: str, device_index: int) -> bool:
        """The site kernels' conditions that do not depend on the call: backend, pattern, no per-layer overrides,
        K and N multiples of 8, the kernel library loaded for the device."""
        return (backend in ("auto", "lynx") and self._uniform and (cfg.n, cfg.m) == (2, 4) and self.k % 8 == 0
                and self.n % 8 == 0 and backends._lynx_ok(device_index))

    def _fused_path(self, cfg, layer, x2) -> str:
        """How this call runs: "fused" (lynx site kernels; "checked" the first time for this config / device /
        dtype, after which every check but the row count is skipped), "dense" (the speed rules) or "layer" (each
        layer on its own through rtlynx.backends)."""
        fast = self._fast
        if fast is not None and fast[0] is cfg and fast[1] == x2.device and fast[2] == x2.dtype:
            if not (cfg.speed_rules and x2.shape[0] <= SPEED_RULES["max_dense_tokens"]):
                return "fused"
        backend = layer.backend
        if self._speed_dense(cfg, backend, x2):
            return "dense"
        return "checked" if self._fusable(cfg, backend, x2) else "layer"

    def _validated(self, cfg, x2) -> None:
        if not _is_compiling():
            self._fast = (cfg, x2.device, x2.dtype)

    def _operand(self, use_lora: bool):
        """(wext, lora_a) for this call: without the LoRA the tail columns are skipped (row stride stays Kg)."""
        if use_lora:
            return self.wext, self.lora_a
        return self._wext_nolora, None

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self.row_parallel:  # this rank holds a slice of K: partial outputs summed over the ranks
            return parallel.row_forward(self, layer, x)
        cfg = layer._settings.config
        mode = layer.mode
        if mode == "dense" or (layer._step_gate is not None and layer._step_gate.dense):
            return F.linear(x, layer.dense_weight(), layer.bias)
        if mode == "weight":
            return F.linear(x, layer._pruned_weight(), layer.bias)
        k = self.k
        if k % cfg.m:
            return layer._forward_remainder(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        use_lora = layer.lora_enabled and layer.lora_A is not None
        path = self._fused_path(cfg, layer, x2)
        if path == "dense":
            return F.linear(x, layer.dense_weight(), layer.bias)
        norm = layer.compensation == "norm"
        fp8 = cfg.dtype == "fp8"
        if path == "fused":
            return self._run_fused(layer, x, x2, use_lora, norm, cfg.eps, fp8=fp8).reshape(*lead, layer.out_features)
        if path == "checked":
            from . import ops

            try:
                y = self._run_fused(layer, x, x2, use_lora, norm, cfg.eps, check=True, fp8=fp8)
            except ops.Unsupported as e:  # fall through to the per-layer path, which warns and falls back
                if not isinstance(e, ops.LibraryUnavailable):  # no kernels at all: the backend fallback says so
                    backends.warn_once(f"site:{e}", f"rtlynx: site {self.name!r} cannot run fused ({e}); "
                                                    f"running its layers one by one")
            else:
                self._validated(cfg, x2)
                return y.reshape(*lead, layer.out_features)
        if fp8:
            return self._forward_fp8(layer, x2, use_lora, cfg).reshape(*lead, layer.out_features)
        lora_a, lora_b = (layer.lora_A, layer.lora_B) if use_lora else (None, None)
        y = backends.run(layer.backend, x2, layer.dense_weight(), layer.bias, cfg.n, cfg.m, layer.compensation,
                         lora_a, lora_b, cfg.eps)
        return y.reshape(*lead, layer.out_features)

    def _forward_fp8(self, layer, x2, use_lora: bool, cfg) -> torch.Tensor:
        """dtype="fp8" where the FP8 site kernels cannot run: the FP8 spec (rtlynx.reference.fp8) on the reference
        path, one layer at a time."""
        backend = layer.backend
        if backend != "reference" and (x2.is_cuda or backend != "auto"):
            backends.warn_once("fp8-emulated", "rtlynx: dtype='fp8' runs emulated on the reference path here (the "
                                               "FP8 sparse kernels need an sm_90 GPU, bf16, K <= 16384): for "
                                               "studying quality, not for speed")
        lora_a, lora_b = (layer.lora_A, layer.lora_B) if use_lora else (None, None)
        if layer.weight_scale is not None:  # stored in FP8: the spec on exactly these quantised weights
            from .reference.fp8 import fp8_sparse_act_linear

            return fp8_sparse_act_linear(x2, None, layer.bias, cfg.n, cfg.m, layer.compensation, lora_a, lora_b,
                                         cfg.eps, weight_q=(layer.weight, layer.weight_scale))
        return backends.run("reference", x2, layer.weight, layer.bias, cfg.n, cfg.m, layer.compensation, lora_a,
                            lora_b, cfg.eps, fp8=True)

    def _gemm(self, x2, wext, bias, lora_a, splits, norm, eps, check):
        from . import ops

        if check or x2.shape[0] == 0:  # validated once per config / device / dtype (the operand is fixed)
            return ops.lynx_site_linear(x2, wext, bias, lora_a, splits, norm, eps)
        return ops.sparse_site(x2 if x2.is_contiguous() else x2.contiguous(), wext, bias, lora_a, splits, norm, eps)

    def fp8_operand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(wq [N, Kp] e4m3, sw [N] float32)``: the site's weights quantised per output channel
        (rtlynx.reference.fp8.quantize_weight_e4m3), made once per build (weights changed in place: call build())."""
        if self._fp8 is None:
            from .reference.fp8 import quantize_rows_e4m3

            if _is_compiling():
                raise RuntimeError(f"site {self.name!r}: the FP8 operand must exist before torch.compile traces the "
                                   "model (rtlynx.sparsify / configure with dtype='fp8' make it)")

            with torch.no_grad():
                self._fp8 = quantize_rows_e4m3(self._wext_nolora)  # zero padding columns: scales unchanged
        return self._fp8

    def _gemm_fp8(self, x2, sl, use_lora, splits, norm, eps, check, act=0):
        """The FP8 site GEMMs for the members in ``sl`` (a row slice, or None for all); the LoRA branch (if on)
        adds ``h_i B_i^T`` in bf16 after the FP8 GEMM (cuBLAS, in place)."""
        from . import ops

        wq, sw = self.fp8_operand()
        bias = self.bias
        if sl is not None:
            wq, sw, bias = wq[sl], sw[sl], None if bias is None else bias[sl]
        xc = x2 if x2.is_contiguous() else x2.contiguous()
        outs = ops.fp8_site(xc, wq, sw, bias, splits, norm, eps, act, check=check)
        if use_lora and self.lora_a is not None:
            h = F.linear(xc, self.lora_a)
            members = range(len(self.layers)) if sl is None else [self.slices.index(sl)]
            for i, y in zip(members, outs):
                a, r = self._lora_offs[i], self._ranks[i]
                if r:
                    y.addmm_(h[:, a: a + r], self.layers[i].lora_B.t())
        return outs

    def _run_fused(self, layer, x, x2, use_lora: bool, norm: bool, eps: float, check: bool = False,
                   fp8: bool = False) -> torch.Tensor:
        compiling = _is_compiling()
        slot = layer._slot
        p = self._pending
        if p is not None and p[0] is x and p[1] == use_lora and (compiling or p[2] == _version(x)):
            left = p[4] - 1  # another member already ran the site on this x: take this member's output
            self._pending = None if left <= 0 else (p[0], p[1], p[2], p[3], left)
            return p[3][slot]
        if not compiling:
            self.ensure()
        wext, lora_a = self._operand(use_lora)

        def gemm(sl, splits):
            if fp8:
                return self._gemm_fp8(x2, sl, use_lora, splits, norm, eps, check)
            if sl is None:
                return self._gemm(x2, wext, self.bias, lora_a, splits, norm, eps, check)
            return self._gemm(x2, wext[sl], None if self.bias is None else self.bias[sl], lora_a, splits, norm, eps,
                              check)

        if len(self.layers) == 1:
            return gemm(None, self.splits)[0]
        if self._split:  # members read different inputs: this member's rows of the operand only
            return gemm(self.slices[slot], (self.splits[slot],))[0]
        if p is not None:  # outputs computed for another input went unused (a well-fed site never gets here)
            self._misses += 1
            if self._misses >= 3:
                self._split = True
                self._pending = None
                backends.warn_once(f"split:{self.name}", f"rtlynx: the {len(self.layers)} layers of site "
                                   f"{self.name!r} are not called with one input; running one GEMM per layer")
                return self._run_fused(layer, x, x2, use_lora, norm, eps, check, fp8)
        outs = gemm(None, self.splits)
        self._pending = (x, use_lora, 0 if compiling else _version(x), outs, len(self.layers) - 1)
        return outs[slot]

    def forward_gelu(self, layer, h: torch.Tensor, gelu) -> torch.Tensor:
        """``layer(gelu(h))`` for a site whose producer is GELU-tanh: on the lynx kernels without a LoRA branch the
        GELU runs inside the prune pass (no dense GELU output is written); otherwise the plain path."""
        cfg = layer._settings.config
        if (layer.mode == "sparse" and not self.row_parallel
                and not (layer._step_gate is not None and layer._step_gate.dense)
                and not (layer.lora_enabled and layer.lora_A is not None) and len(self.layers) == 1):
            h2 = h.reshape(-1, self.k)
            path = self._fused_path(cfg, layer, h2)
            if path in ("fused", "checked"):
                from . import ops

                if not _is_compiling():
                    self.ensure()
                norm, check = layer.compensation == "norm", path == "checked"
                try:
                    if cfg.dtype == "fp8":
                        y = self._gemm_fp8(h2, None, False, self.splits, norm, cfg.eps, check, act=1)[0]
                    else:
                        y = ops.lynx_site_gelu(h2, self._operand(False)[0], self.bias, norm, cfg.eps, check=check)
                except ops.Unsupported as e:
                    if not isinstance(e, ops.LibraryUnavailable):  # no kernels: the backend fallback warns
                        backends.warn_once(f"gelu:{e}", f"rtlynx: GELU site {self.name!r} cannot run fused ({e})")
                else:
                    self._validated(cfg, h2)
                    return y.reshape(*h.shape[:-1], layer.out_features)
        return layer(gelu(h))


# ---------------------------------------------------------------------------------------------- producers
def _gelu_feedforward_forward(self, hidden_states, *args, **kwargs):
    """diffusers FeedForward(GELU-tanh) forward with the down-projection read from the pre-activation."""
    if self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.net):
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states
    up, down = self.net[0], self.net[2]
    y = down._site.forward_gelu(down, up.proj(hidden_states), up.gelu)
    for module in list(self.net)[3:]:
        y = module(y)
    return y


def _gelu_feedforward(parent: nn.Module, layer) -> bool:
    """Whether ``parent`` is a diffusers FeedForward [GELU(tanh) with .proj, Dropout*, layer, Dropout*]."""
    net = getattr(parent, "net", None)
    if type(parent).__name__ != "FeedForward" or not isinstance(net, nn.ModuleList) or len(net) < 3:
        return False
    up = net[0]
    return (type(up).__name__ == "GELU" and getattr(up, "approximate", None) == "tanh" and hasattr(up, "proj")
            and net[2] is layer and all(isinstance(m, nn.Dropout) for i, m in enumerate(net) if i not in (0, 2)))


def install_producer(module: nn.Module, site: Site) -> None:
    """Wire the site's producer into the model (the GELU FeedForward forward); downgrade to "plain" if the
    module is not what the rule expects."""
    if site.producer != "gelu":
        return
    parent = module.get_submodule(site.name) if site.name else module
    if len(site.layers) == 1 and _gelu_feedforward(parent, site.layers[0]):
        # a partial of a module-level function pickles (a bound MethodType is looked up by name on unpickling)
        parent.forward = functools.partial(_gelu_feedforward_forward, parent)
        parent._rtlynx_producer = site
    else:
        site.producer = "plain"


def remove_producers(module: nn.Module) -> None:
    for mod in module.modules():
        if getattr(mod, "_rtlynx_producer", None) is not None:
            del mod._rtlynx_producer
            if "forward" in mod.__dict__:
                del mod.forward


# ---------------------------------------------------------------------------------------------- grouping
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


def build_sites(module: nn.Module, names: list[str], rules) -> list[Site]:
    """Group the (already replaced) sparse layers ``names`` of ``module`` into sites and wire the producers."""
    sites = []
    for members, producer, parent in group_sites(names, rules):
        layers = [module.get_submodule(n) for n in members]
        if len({l.in_features for l in layers}) > 1:  # a rule matched layers of different K: one site each
            for n, l in zip(members, layers):
                sites.append(Site([l], "plain", n))
            continue
        site = Site(layers, producer, parent)
        install_producer(module, site)
        sites.append(site)
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


# ---------------------------------------------------------------------------------------------- verification
def verify(model: nn.Module, *args, prefixes: tuple[str, ...] | None = None, **kwargs) -> dict[str, float]:
    """Run ``model(*args, **kwargs)`` once and compare every site (optionally only those whose name starts with one
    of ``prefixes``) on the inputs it really sees with the per-layer reference spec
    (:func:`rtlynx.reference.sparse_act_linear` in float32 on the same operands; with ``dtype="fp8"`` the FP8 spec
    :func:`rtlynx.reference.fp8.fp8_sparse_act_linear`): ``{site name: relative error}``.
    Independent of the drift between whole forwards (a rounding difference that flips a near-tie top-2 choice
    downstream makes two correct paths diverge)."""
    from . import reference

    # (row-parallel sites are left out: a layer's output there is the sum over ranks, not a function of its input)
    picked = [s for s in model_sites(model) if (prefixes is None or s.name.startswith(prefixes)) and not s.row_parallel]
    seen: dict = {}
    hooks = []

    def grab(key):
        return lambda mod, a, out: seen.__setitem__(key, (a[0].detach(), out.detach()))

    for site in picked:
        if site.producer == "gelu":
            parent = model.get_submodule(site.name)
            hooks.append(parent.net[0].proj.register_forward_hook(grab((site.name, "h"))))
            hooks.append(parent.register_forward_hook(grab((site.name, "y"))))
        else:
            for i, layer in enumerate(site.layers):
                hooks.append(layer.register_forward_hook(grab((site.name, i))))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()

    def spec(layer, x):
        use = layer.lora_enabled and layer.lora_A is not None
        a, b = (layer.lora_A, layer.lora_B) if use else (None, None)
        x2, w = x.reshape(-1, layer.in_features), layer.dense_weight()
        if layer.in_features % layer.m:  # the layer zero-pads the last group (k_remainder="pad")
            x2, w = reference.pad_to_multiple(x2, layer.m), reference.pad_to_multiple(w, layer.m)
            a = None if a is None else reference.pad_to_multiple(a, layer.m)
        if layer._settings.config.dtype == "fp8":  # the FP8 spec: same quantisation, float32 products and sums
            from .reference.fp8 import fp8_sparse_act_linear

            wq = None if layer.weight_scale is None else (layer.weight, layer.weight_scale)  # stored: these
            return fp8_sparse_act_linear(x2, w, layer.bias, layer.n, layer.m, layer.compensation, a, b,
                                         layer._settings.config.eps, weight_q=wq)
        return reference.sparse_act_linear(x2, w, layer.bias, layer.n, layer.m, layer.compensation, a, b,
                                           compute_dtype=torch.float32)

    errs = {}
    with torch.no_grad():
        for site in picked:
            if site.producer == "gelu":
                if (site.name, "h") not in seen:
                    continue
                (_, h), (_, y) = seen[(site.name, "h")], seen[(site.name, "y")]
                want = spec(site.layers[0], reference.gelu_tanh(h))
                got = y.reshape(want.shape)
            else:
                if any((site.name, i) not in seen for i in range(len(site.layers))):
                    continue
                parts = [(spec(l, seen[(site.name, i)][0]), seen[(site.name, i)][1]) for i, l in enumerate(site.layers)]
                want = torch.cat([w for w, _ in parts], 1)
                got = torch.cat([g.reshape(w.shape) for w, g in parts], 1)
            errs[site.name] = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
    return errs
