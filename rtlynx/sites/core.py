"""The site: which path a call takes (fused site kernels, dense by the speed rules, or layer by layer) and the
sharing of one prune pass and GEMM between the members (see :mod:`rtlynx.sites`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends, ops, reference
from ..families import family_of
from ..presets import SPEED_RULES
from ..reference.fp8 import fp8_centre_rows
from . import adapters, shard
from .operand import TAIL_COMP, TAIL_FULL, TAIL_NONE, Operand, _is_compiling, _version


class Settings:
    """The one :class:`~rtlynx.config.SparsityConfig` of a sparsified model (``.config``), shared by reference."""

    def __init__(self, config):
        self.config = config

    def __repr__(self) -> str:
        return f"Settings({self.config!r})"


class Site(Operand):
    """One producer and the sparse layers that read its output (see :mod:`rtlynx.sites`)."""

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
        # the submodule (of the site's module) whose output the producer reads: set by the integration that wires
        # the producer in (rtlynx.integrations.diffusers.install_producer), for sites.verify
        self.producer_input: str | None = None
        self.name = name
        self.k = k
        self.n = sum(l.out_features for l in layers)
        for i, layer in enumerate(layers):
            layer._site, layer._slot = self, i
        self.tp = shard.site_shard(layers, name)  # tensor-parallel split (rtlynx.parallel), None on one GPU
        self.row_parallel = self.tp is not None and self.tp.style == "rowwise"
        self._misses = 0
        self._split = False       # members read different inputs: one GEMM each
        # Why the speed rules keep this site dense on the GPU kernels (its shape alone), None if they do not.
        self.slow_reason = self._slow_reason()
        self._uniform = not any(l._override for l in layers)
        self.build()              # also sets the per-build state: _pending, _fast, _applied, _dirty, _weights

    def refresh_overrides(self) -> None:
        self._uniform = not any(l._override for l in self.layers)
        self._fast = None
        self._prepare()

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
        return (family_of(cfg.dtype).operand_ok(self, x2) and x2.is_cuda
                and self._kernels_ok(cfg, backend, backends._device_index(x2)))

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

    def forward(self, layer, x: torch.Tensor, user_tail: bool = False) -> torch.Tensor:
        """``layer(x)``; ``user_tail``: the layer's own adapters ride in the tail (its PEFT wrapper asked
        :func:`rtlynx.sites.adapters.carries` first and adds nothing)."""
        cfg = layer._settings.config
        if self.row_parallel:  # this rank holds a slice of K: partial outputs summed over the ranks
            if cfg.centre is not None and layer.mode == "sparse":
                raise NotImplementedError(f"site {self.name!r}: centre={cfg.centre!r} on a row-parallel (K-split) "
                                          "site is not supported; use centre=None with tensor parallelism")
            return shard.row_forward(self, layer, x)
        mode = layer.mode
        if mode == "dense" or (layer._step_gate is not None and layer._step_gate.dense):
            return F.linear(x, layer.dense_weight(), layer.bias)
        if mode == "weight":
            return F.linear(x, layer._pruned_weight(), layer.bias)
        if cfg.centre is not None:
            return self._forward_centred(layer, x, user_tail, cfg)
        return self._forward_sparse(layer, x, user_tail, cfg)

    def _forward_centred(self, layer, x, user_tail: bool, cfg) -> torch.Tensor:
        """SparsityConfig.centre: the site prunes ``x - c`` (c: each sample's token mean, computed once for all
        members) and adds the exact output of c back, ``c W^T + LoRA(c)`` (LoRA(x) = LoRA(x - c) + LoRA(c)):
        rtlynx.reference.sparse_act_linear with ``centre``. c rides in the same GEMM as extra 2:4-exact rows a sample
        (native dtype: two, rtlynx.reference.centre_rows; FP8: four, rtlynx.reference.fp8.fp8_centre_rows, the second
        pair the residual of the first pair's e4m3 quantisation), so the weights are read once, an FP8 site needs no
        bf16 weights, and the LoRA tail (users' adapters included) covers c too. On the site kernels x - c is formed
        inside the prune kernel (:meth:`_centre_in_kernel`); elsewhere ``[x - c; rows]`` is built once per site call."""
        x2 = x.reshape(-1, self.k)
        if x2.shape[0] == 0 or self._fused_path(cfg, layer, x2) == "dense":  # nothing to prune (speed rules, M = 0)
            return F.linear(x, layer.dense_weight(), layer.bias)
        in_kernel = self._centre_in_kernel(cfg, layer, x2)
        compiling = _is_compiling()
        cc = self._centred
        if cc is not None and cc[0] is x and (compiling or cc[1] == _version(x)):
            c, rows, xs = cc[2], cc[3], cc[4]
            self._centred = None if cc[5] <= 1 else (*cc[:5], cc[5] - 1)
        else:
            c = reference.token_mean(x)
            rows = fp8_centre_rows(c, x.dtype) if cfg.dtype == "fp8" else reference.centre_rows(c, x.dtype)
            xs = None if in_kernel else self._centred_rows(x, c, rows)
            shared = len(self.layers) > 1 and not self._split  # the other members reuse c, its rows and x - c
            self._centred = (x, 0 if compiling else _version(x), c, rows, xs, len(self.layers) - 1) if shared else None
        if xs is None:
            y = self._forward_sparse(layer, x, user_tail, cfg, centre=(c, rows))
        else:
            y = self._forward_sparse(layer, xs, user_tail, cfg)
        tokens = x2.shape[0]  # the token rows, then `per` rows a sample
        per = 4 if cfg.dtype == "fp8" else 2
        back = y[tokens:].float().reshape(per, -1, y.shape[-1]).sum(0)  # c W^T + LoRA(c) + per * b
        if layer.bias is not None:
            back = back - per * layer.bias.float()
        if per == 4:  # the residual pair went through the LoRA tail too: take its LoRA terms back out (small GEMMs)
            a, b = adapters.member_factors(self, layer, user_tail)
            if a is not None:
                samples = back.shape[0]
                r = rows[2 * samples:].reshape(2, samples, self.k).sum(0)
                back = back - F.linear(F.linear(r, a.to(r.dtype)), b.to(r.dtype)).float()
        lead = c.shape[:-1]  # [..., 1]: one row per sample, broadcast over its tokens
        return y[:tokens].reshape(*x.shape[:-1], -1) + back.to(y.dtype).reshape(*lead, -1)

    def _centred_rows(self, x, c, rows) -> torch.Tensor:
        """``[x - c; rows]`` [M + R, K]: what a centred site's GEMM runs on, written out (the per-layer paths)."""
        return torch.cat([reference.centred(x, c).reshape(-1, self.k), rows])

    def _centre_in_kernel(self, cfg, layer, x2) -> bool:
        """Whether this call centres inside the site kernels' prune (the fused path, a library with the centring
        prune), instead of running on ``[x - c; rows]`` written out."""
        return (self.k % cfg.m == 0 and self._fused_path(cfg, layer, x2) in ("fused", "checked")
                and ops.centre_in_kernels(cfg.dtype))

    def _forward_sparse(self, layer, x, user_tail: bool, cfg, centre=None) -> torch.Tensor:
        """``centre`` ``(c, rows)``: x's tokens are centred inside the prune kernel and the output is the 2-D
        ``[M + R, N]`` of ``[x - c; rows]`` (a call that cannot run fused builds those rows and goes on without)."""
        k = self.k
        x2 = x.reshape(-1, k)
        path = self._fused_path(cfg, layer, x2)
        cen = None
        if centre is not None:
            if k % cfg.m or path not in ("fused", "checked"):  # centring outside the kernels: the rows written out
                return self._forward_sparse(layer, self._centred_rows(x, *centre), user_tail, cfg)
            cen = (centre[0].reshape(-1, k).contiguous(), centre[1])
        if k % cfg.m:
            return layer._forward_remainder(x)
        lead = x.shape[:-1]
        use_lora = layer.lora_enabled and layer.lora_A is not None
        tail = TAIL_FULL if user_tail else TAIL_COMP if use_lora else TAIL_NONE
        if path == "dense":
            return F.linear(x, layer.dense_weight(), layer.bias)
        norm = layer.compensation == "norm"
        family = family_of(cfg.dtype)
        shape = (-1, layer.out_features) if cen is not None else (*lead, layer.out_features)
        if path == "fused":
            return self._run_fused(family, layer, x, x2, tail, norm, cfg.eps, centre=cen).reshape(shape)
        if path == "checked":
            try:
                y = self._run_fused(family, layer, x, x2, tail, norm, cfg.eps, check=True, centre=cen)
            except ops.Unsupported as e:  # fall through to the per-layer path, which warns and falls back
                if not isinstance(e, ops.LibraryUnavailable):  # no kernels at all: the backend fallback says so
                    backends.warn_once(f"site:{e}", f"rtlynx: site {self.name!r} cannot run fused ({e}); "
                                                    f"running its layers one by one")
                if cen is not None:
                    return self._forward_sparse(layer, self._centred_rows(x, *centre), user_tail, cfg)
            else:
                self._validated(cfg, x2)
                return y.reshape(shape)
        lora_a, lora_b = adapters.member_factors(self, layer, user_tail)  # user_tail: the wrapper adds nothing
        return family.run_layer(layer, x2, lora_a, lora_b, cfg).reshape(*lead, layer.out_features)

    def _gemm(self, family, x2, sl, tail, splits, norm, eps, check, act=0, centre=None):
        """Every site GEMM goes through here (one call per prune pass): the family's kernels."""
        return family.run_site(self, x2, sl, tail, splits, norm, eps, check, act, centre)

    def _same_tail(self, done: int, tail: int, slot: int) -> bool:
        """Whether outputs computed with ``done`` serve a call of member ``slot`` that wants ``tail``: the user rows
        add nothing to a member whose adapters do not ride in the tail (its B columns there are zero)."""
        if done == TAIL_FULL and not self._carry[slot]:
            done = TAIL_COMP
        return done == tail or (not self._rcp and done != TAIL_FULL and tail != TAIL_FULL)

    def _run_fused(self, family, layer, x, x2, tail: int, norm: bool, eps: float,
                   check: bool = False, centre=None) -> torch.Tensor:
        compiling = _is_compiling()
        slot = layer._slot
        p = self._pending
        if p is not None and p[0] is x and self._same_tail(p[1], tail, slot) and (compiling or p[2] == _version(x)):
            left = p[4] - 1  # another member already ran the site on this x: take this member's output
            self._pending = None if left <= 0 else (p[0], p[1], p[2], p[3], left)
            return p[3][slot]
        if not compiling:
            self.ensure()
            adapters.sync(self)  # every member's adapter rows, before the GEMM that computes all their outputs
            p = self._pending

        def gemm(sl, splits):
            return self._gemm(family, x2, sl, tail, splits, norm, eps, check, centre=centre)

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
                return self._run_fused(family, layer, x, x2, tail, norm, eps, check, centre)
        outs = gemm(None, self.splits)
        self._pending = (x, tail, 0 if compiling else _version(x), outs, len(self.layers) - 1)
        return outs[slot]

    def forward_gelu(self, layer, h: torch.Tensor, gelu) -> torch.Tensor:
        """``layer(gelu(h))`` for a site whose producer is GELU-tanh: on the lynx kernels without a LoRA branch the
        GELU runs inside the prune pass (no dense GELU output is written); otherwise the plain path."""
        cfg = layer._settings.config
        if (layer.mode == "sparse" and not self.row_parallel and cfg.centre is None  # centring needs GELU's output
                and not (layer._step_gate is not None and layer._step_gate.dense)
                and not (layer.lora_enabled and layer.lora_A is not None) and len(self.layers) == 1):
            h2 = h.reshape(-1, self.k)
            path = self._fused_path(cfg, layer, h2)
            if path in ("fused", "checked"):
                if not _is_compiling():
                    self.ensure()
                norm, check = layer.compensation == "norm", path == "checked"
                try:
                    y = self._gemm(family_of(cfg.dtype), h2, None, TAIL_NONE, self.splits, norm, cfg.eps, check,
                                   act=1)[0]
                except ops.Unsupported as e:
                    if not isinstance(e, ops.LibraryUnavailable):  # no kernels: the backend fallback warns
                        backends.warn_once(f"gelu:{e}", f"rtlynx: GELU site {self.name!r} cannot run fused ({e})")
                else:
                    self._validated(cfg, h2)
                    return y.reshape(*h.shape[:-1], layer.out_features)
        return layer(gelu(h))
