"""Kernel families: one object per dtype that a site runs in, behind one small interface.

A family says what it supports (:meth:`Family.operand_ok`, :attr:`Family.splits_k`), how it prepares a site's
weights (:meth:`Family.prepare`), how it runs a site's GEMMs with their LoRA tail
(:meth:`Family.run_site`), how one layer runs where the site kernels cannot (:meth:`Family.run_layer`, through the
per-layer backends it has, :attr:`Family.layer_backends`: bf16 the lynx, cuSPARSELt and reference ones of
:mod:`rtlynx.backends`, FP8 its spec on the reference path) and what the spec of a layer is
(:meth:`Family.spec`, for :func:`rtlynx.sites.verify`). ``SparsityConfig.dtype`` picks the family
(:data:`FAMILIES`); a new dtype (FP4 on the next GPU) is one new family here.

This file is where FP8 differs from bf16: the FP8 operand is quantised per output channel (``site.fp8_operand``),
its LoRA tail (the compensation LoRA and the user's adapters: one ``h = x A^T``) is added after the GEMM in bf16
inside the site op (:meth:`FP8Family.tail_operands`), a
row-parallel (K-split) site cannot scale its tokens, and where the kernels cannot run it is emulated on the FP8 spec
(:mod:`rtlynx.reference.fp8`): its one per-layer backend.
"""

from __future__ import annotations

import torch

from . import backends, ops, reference
from .reference.fp8 import fp8_sparse_act_linear


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


class Family:
    """The interface (and bf16's implementation: the operand ``[W | 0 | B-expanded]`` of rtlynx.sites.operand)."""

    dtype = "native"
    splits_k = True  # a row-parallel site (this rank holds a slice of K) can run in this dtype
    layer_backends: dict[str, backends.Backend] = backends.BACKENDS  # the per-layer kernels of this dtype, by name

    def prepare(self, site, cfg) -> None:
        """Put the site's weights in this family's storage format (sparsify / configure / build, not at a call that
        torch.compile may trace): bf16 frees an FP8 copy and gives FP8-only members dense weights back."""
        if site._fp8_stored:
            site.restore_dense()  # back to native: dequantised, with a warning
        site._fp8 = None

    def operand_ok(self, site, x2: torch.Tensor) -> bool:
        """Whether the site holds an operand that this family's site kernels read for inputs like ``x2``."""
        return not site._fp8_stored and site.wext is not None and x2.dtype == site.wext.dtype

    def run_site(self, site, x2, sl, tail: int, splits, norm: bool, eps: float, check: bool,
                 act: int = 0, centre=None) -> list[torch.Tensor]:
        """The site GEMMs of the members in ``sl`` (a row slice, or None for all): one output per member. ``tail``:
        what of the LoRA tail the call reads (rtlynx.sites.operand.TAIL_*: none, the compensation LoRA, with the
        user's adapters too). ``act`` 1: the producer's GELU-tanh runs in the prune pass (one member, no LoRA).
        ``check``: validate the operands (the first call per config / device / dtype), after which the unchecked op
        runs. ``centre``: ``(c [B, K] float32, centre rows [R, K])``, token-mean centring in the prune kernel (the
        outputs then have M + R rows: ``[x - c; rows]``)."""
        wext, lora_a = site._operand(tail)
        bias = site.bias
        if sl is not None:
            wext, bias = wext[sl], None if bias is None else bias[sl]
        if act:
            return [ops.lynx_site_gelu(x2, wext, bias, norm, eps, check=check)]
        c, rows = (None, None) if centre is None else centre
        if check or x2.shape[0] == 0:
            return ops.lynx_site_linear(x2, wext, bias, lora_a, splits, norm, eps, c, rows)
        return ops.sparse_site(_contiguous(x2), wext, bias, lora_a, splits, norm, eps, c, rows)

    def run_layer(self, layer, x2, lora_a, lora_b, cfg) -> torch.Tensor:
        """One layer where the site kernels cannot run: rtlynx.backends' chain (lynx, cuSPARSELt, reference)."""
        return self.run_backend(layer.backend, x2, layer.dense_weight(), layer.bias, cfg.n, cfg.m,
                                layer.compensation, lora_a, lora_b, cfg.eps)

    def run_backend(self, backend: str, *args) -> torch.Tensor:
        """One layer on ``backend`` (a SparseActLinear backend name), falling back along the chain to one that this
        family has and that can run the call."""
        return backends.run(backend, *args, backends=self.layer_backends)

    def spec(self, layer, x2, w, lora_a, lora_b, centre=None) -> torch.Tensor:
        """The layer's output by the spec, in float32 on the same operands (``centre``: each row's, or None)."""
        return reference.sparse_act_linear(x2, w, layer.bias, layer.n, layer.m, layer.compensation, lora_a, lora_b,
                                           compute_dtype=torch.float32, centre=centre)


class FP8Spec(backends.Backend):
    """The FP8 family's per-layer backend: the FP8 spec, emulated on the reference path (its kernels run whole
    activation sites only)."""

    name, fallback = "reference", None

    def run(self, x, weight, bias, n, m, compensation, lora_a, lora_b, eps):
        return fp8_sparse_act_linear(x, weight, bias, n, m, compensation, lora_a, lora_b, eps)


class FP8Family(Family):
    """FP8 e4m3 activations and weights (per-token / per-channel scales) on the FP8 site kernels."""

    dtype = "fp8"
    splits_k = False  # the per-token scale needs the token's whole K
    layer_backends = {"reference": FP8Spec()}  # lynx / cuSPARSELt have no FP8 layer kernel: the chain ends here

    def prepare(self, site, cfg) -> None:
        """Quantise the FP8 operand now; without ``keep_dense_weights`` drop the bf16 one where the FP8 kernels run."""
        if site._fp8_stored and cfg.keep_dense_weights:
            site.restore_dense()  # asked to keep bf16 weights now: dequantised, with a warning
        if site._wext_nolora is not None and site._wext_nolora.is_cuda:
            site.fp8_operand()
            # centring needs no bf16 weights: the centre rides in the FP8 GEMM (rtlynx.reference.fp8.fp8_centre_rows)
            if not cfg.keep_dense_weights and site._fp8_storable(cfg):
                site._store_fp8()

    def operand_ok(self, site, x2: torch.Tensor) -> bool:
        if site._fp8_stored:  # the FP8 operand is all there is
            return x2.dtype == site.layers[0].compute_dtype
        return super().operand_ok(site, x2)

    def run_site(self, site, x2, sl, tail, splits, norm, eps, check, act=0, centre=None):
        wq, sw = site.fp8_operand()
        bias = site.bias
        if sl is not None:
            wq, sw, bias = wq[sl], sw[sl], None if bias is None else bias[sl]
        a, bs, terms = self.tail_operands(site, sl, tail)
        c, rows = (None, None) if centre is None else centre
        return ops.fp8_site(_contiguous(x2), wq, sw, bias, splits, norm, eps, act, check=check, lora_a=a, lora_b=bs,
                            lora_terms=terms, centre=c, centre_rows=rows)

    def tail_operands(self, site, sl, tail) -> tuple:
        """The LoRA tail of the FP8 site op (``y_i += (x A^T)[:, c0:c1] B^T`` in bf16 after its GEMMs, inside the op):
        ``(A of the whole tail or None, [B per term], [member, c0, c1 per term])``, the compensation LoRA and the
        user adapters' rows; members numbered within ``sl``'s call (0 for a single member's slice)."""
        a = site.tail_a(tail) if tail else None
        if a is None:
            return None, [], []
        members = range(len(site.layers)) if sl is None else [site.slices.index(sl)]
        bs, terms = [], []
        for j, i in enumerate(members):
            for cols, b in site.lora_terms(i, tail):
                bs.append(b)
                terms += [j, cols.start, cols.stop]
        return (a, bs, terms) if bs else (None, [], [])

    def run_layer(self, layer, x2, lora_a, lora_b, cfg) -> torch.Tensor:
        """Where the FP8 site kernels cannot run: the FP8 spec on the reference path, one layer at a time."""
        backend = layer.backend
        if backend != "reference" and (x2.is_cuda or backend != "auto"):
            backends.warn_once("fp8-emulated", "rtlynx: dtype='fp8' runs emulated on the reference path here (the "
                                               "FP8 sparse kernels need an sm_90 GPU, bf16, K <= 16384): for "
                                               "studying quality, not for speed")
        if layer.weight_scale is not None:  # stored in FP8: the spec on exactly these quantised weights
            return fp8_sparse_act_linear(x2, None, layer.bias, cfg.n, cfg.m, layer.compensation, lora_a, lora_b,
                                         cfg.eps, weight_q=(layer.weight, layer.weight_scale))
        return self.run_backend("reference", x2, layer.weight, layer.bias, cfg.n, cfg.m, layer.compensation, lora_a,
                                lora_b, cfg.eps)

    def spec(self, layer, x2, w, lora_a, lora_b, centre=None):
        """The FP8 spec: same quantisation, float32 products and sums (on the stored FP8 weights where they are);
        ``centre``: on ``x - c``, the centre's output from its FP8 rows (rtlynx.reference.fp8.fp8_centre_rows)."""
        wq = None if layer.weight_scale is None else (layer.weight, layer.weight_scale)
        return fp8_sparse_act_linear(x2, w, layer.bias, layer.n, layer.m, layer.compensation, lora_a, lora_b,
                                     layer._settings.config.eps, weight_q=wq, centre=centre)


FAMILIES = {f.dtype: f for f in (Family(), FP8Family())}  # SparsityConfig.dtype -> its family


def family_of(dtype: str) -> Family:
    return FAMILIES[dtype]


__all__ = ["FAMILIES", "FP8Family", "FP8Spec", "Family", "family_of"]
