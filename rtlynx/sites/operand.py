"""A site's shared GEMM operand and its storage formats (the storage half of :class:`rtlynx.sites.Site`).

bf16: one ``wext [N_1 + ... + N_k, Kp + 2 rp] = [W_cat | 0 | B-expanded]`` (the LoRA tail: B's column t at
Kp + 2t, the layout of :func:`rtlynx.reference.sm90.expand_lora_b`), a bias and a LoRA-A buffer; the layers'
``weight``, ``bias``, ``lora_A`` and ``lora_B`` parameters are re-pointed at views of them (no second copy). The
tail is the compensation LoRA's segment, then the rows reserved for the user's adapters (:mod:`.adapters`); a call
reads none of it, the first segment or both (:data:`TAIL_NONE`, :data:`TAIL_COMP`, :data:`TAIL_FULL`).
FP8: ``(wq [N, Kp] e4m3, sw [N])`` quantised from it, next to it or, without ``keep_dense_weights``, instead of it
(the layers' ``weight`` / ``weight_scale`` then view ``wq`` / ``sw``). Which format a site keeps is its dtype's
family's choice (:meth:`rtlynx.families.Family.prepare`).
"""

from __future__ import annotations

import torch

from .. import backends
from ..families import family_of
from ..reference.fp8 import quantize_rows_e4m3
from ..reference.sm90 import round_up
from . import adapters

TAIL_NONE, TAIL_COMP, TAIL_FULL = 0, 1, 2  # what of the LoRA tail a call reads (True / False: with / without LoRA)
TAIL_ALIGN = 64  # tail segments padded to this many rows (2 columns each: whole 128-wide K tiles); ranks within cost the same


def fill_rank(members: int) -> int:
    """The largest compensation LoRA rank per member that keeps a site of ``members`` layers at one TAIL_ALIGN
    segment, i.e. what rank 8 costs on the bf16 site kernels (64, 32, 21, 16 for 1-4 members)."""
    if members < 1:
        raise ValueError(f"a site has at least one member, got {members}")
    return TAIL_ALIGN // members


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


class Operand:
    """The storage of a site (a base class of :class:`rtlynx.sites.Site`: the kernels read these attributes)."""

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
        self._rcp = rcp = round_up(sum(ranks), TAIL_ALIGN)  # the compensation segment
        uranks = adapters.room(self, getattr(self, "_uranks", ()))
        self._uranks = tuple(uranks)  # rows reserved for each member's own adapters, after the segment
        self._uoffs = tuple(rcp + sum(uranks[:i]) for i in range(len(uranks)))
        self.rank = sum(ranks) + sum(uranks)
        self.rp = rp = rcp + round_up(sum(uranks), TAIL_ALIGN)
        n = len(ls)
        # per member: its adapters ride in the tail, their parameters want gradients, what they were filled from
        self._carry, self._user_grad, self._user_sig = [False] * n, [False] * n, [None] * n
        self._user_b = None  # the user adapters' B where no bf16 operand holds it (weights stored in FP8)
        kg = kp + 2 * rp
        offs, o = [], 0
        for l in ls:
            offs.append(o)
            o += l.out_features
        self.slices = tuple(slice(a, a + l.out_features) for a, l in zip(offs, ls))
        self.splits = tuple(l.out_features for l in ls)
        self._pending = None      # (x, lora on, x version, per-member outputs, calls left)
        self._centred = None      # (x, x version, centre, x - centre, calls left): SparsityConfig.centre
        self._fp8 = None          # (wq, sw) of the FP8 kernels, made at their first use (fp8_operand)
        self._fp8_stored = all(stored)  # the layers' weights live in _fp8 (no bf16 copy: keep_dense_weights off)
        self._fast = None         # (config, device, dtype) of the last call that passed every fused-path check
        self._applied: set[int] = set()
        self._dirty = False
        self._weights = tuple(l.weight for l in ls)  # the parameter objects whose addresses ensure() checks
        self._wptrs = tuple(w.data_ptr() for w in self._weights)
        if any(t.device != dev or t.dtype != dt for t in tensors) or dev.type == "meta":
            # mixed devices / dtypes: no shared operand, every member runs on its own
            self.wext = self.bias = self.lora_a = self._wext_nolora = self._wext_comp = self._lora_a_comp = None
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
        self._wext_comp = wext[:, : kp + 2 * rcp] if rp != rcp else wext  # ... without the user adapters' rows
        self._wptrs = tuple(w.data_ptr() for w in self._weights)  # re-pointed at the operand
        adapters.fill(self)
        self._prepare()

    def _build_lora_a_bias(self, dev, dt):
        """The members' LoRA A stacked ``[rp, K]`` and biases concatenated ``[N]`` (None where there are none),
        the layers' parameters re-pointed at them."""
        ls = self.layers
        lora_a = None
        if self.rp:
            lora_a = torch.zeros(self.rp, self.k, device=dev, dtype=dt)
            for l, r, roff in zip(ls, self._ranks, self._lora_offs):
                if r:
                    lora_a[roff: roff + r].copy_(l.lora_A)
                    _repoint(l.lora_A, lora_a[roff: roff + r])
        self._lora_a_comp = lora_a if self.rp == self._rcp else lora_a[: self._rcp]
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
        in the layers' own tensors and the user adapters' in one compact buffer (the FP8 path adds h B^T after the
        GEMM)."""
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
            if sum(self._uranks):
                self._user_b = torch.zeros(self.n, sum(self._uranks), device=dev, dtype=ls[0].compute_dtype)
        self.wext = self._wext_nolora = self._wext_comp = None
        self._fp8 = (wq, sw)
        self._wptrs = tuple(w.data_ptr() for w in self._weights)
        adapters.fill(self)

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
            ru = sum(self._uranks)
            if ru:  # the user adapters' B, off the tail too
                c = self.kp + 2 * self._rcp
                self._user_b = self.wext[:, c: c + 2 * ru: 2].clone()
        self.wext = self._wext_nolora = self._wext_comp = None
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
        self.wext = self.bias = self.lora_a = self._wext_nolora = self._wext_comp = self._user_b = None
        self._pending = self._fp8 = self._centred = None
        self._carry = [False] * len(self.layers)

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

    def _prepare(self) -> None:
        """The weights in the storage format of the configured dtype's family (rtlynx.families), made now
        (sparsify / configure / build), not at a first call that torch.compile may be tracing with fake tensors."""
        settings = getattr(self.layers[0], "_settings", None)
        if settings is not None:
            family_of(settings.config.dtype).prepare(self, settings.config)

    def fp8_operand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(wq [N, Kp] e4m3, sw [N] float32)``: the site's weights quantised per output channel
        (rtlynx.reference.fp8.quantize_weight_e4m3), made once per build (weights changed in place: call build())."""
        if self._fp8 is None:
            if _is_compiling():
                raise RuntimeError(f"site {self.name!r}: the FP8 operand must exist before torch.compile traces the "
                                   "model (rtlynx.sparsify / configure with dtype='fp8' make it)")

            with torch.no_grad():
                self._fp8 = quantize_rows_e4m3(self._wext_nolora)  # zero padding columns: scales unchanged
        return self._fp8

    def _operand(self, tail: int):
        """(wext, lora_a) for this call (``tail``: TAIL_*): the tail columns a call does not read are skipped (the
        row stride stays Kg)."""
        if tail == TAIL_FULL or (tail and self.rp == self._rcp):
            return self.wext, self.lora_a
        if tail and self._rcp:
            return self._wext_comp, self._lora_a_comp
        return self._wext_nolora, None

    def tail_a(self, tail: int) -> torch.Tensor | None:
        """The rows of ``lora_a`` a call with ``tail`` reads (None: no LoRA term)."""
        if tail == TAIL_FULL or (tail and self.rp == self._rcp):
            return self.lora_a
        return self._lora_a_comp if tail and self._rcp else None

    def lora_terms(self, i: int, tail: int) -> list:
        """Member ``i``'s ``(columns of h = x tail_a^T, B [N_i, r])`` for a call with ``tail`` (the FP8 path adds
        ``h B^T`` after its GEMM): the compensation LoRA, then the user adapters' reserved rows."""
        out = []
        if tail and self._ranks[i]:
            a = self._lora_offs[i]
            out.append((slice(a, a + self._ranks[i]), self.layers[i].lora_B))
        if tail == TAIL_FULL and self._carry[i]:
            u = self._uoffs[i]
            out.append((slice(u, u + self._uranks[i]), adapters.user_b(self, i)))
        return out
