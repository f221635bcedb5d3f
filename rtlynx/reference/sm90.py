"""The "sm90" layout of a 2:4-compressed activation: what rtlynx's Hopper kernels emit and the CUTLASS 3.x
sparse GEMM (``Sm90GemmSparseConfig``, 16-bit A, K-major, tile K 128) reads. Pure torch, runs anywhere.

Relation to the "rows" layout of :mod:`rtlynx.reference.nm` (2:4 only, 16-bit values):

- ``Mp = round_up(M, 64)``, ``Kp = round_up(K, 128)``: X is zero-padded to ``[Mp, Kp]`` first (a zero group keeps
  indices 0 and 1, nibble ``0b0100``).
- values: ``[M, Kp/2]``, identical to the rows layout of the padded X (kept elements in index order).
- meta: ``Mp * Kp / 8`` bytes = the rows-layout metadata of the padded X (``[Mp, Kp/8]`` bytes) permuted in
  units of 16-bit words (one word = the four nibbles of 16 consecutive elements of one row). For row
  ``m = m0 + 8 m1 + 16 m2 + 64 ma`` and word column ``kw = k/16 = k1 + 2 k2 + 8 ka``
  (``m0 < 8, m1 < 2, m2 < 4, k1 < 2, k2 < 4``) the word lands at
  ``m1 + 2 k2 + 8 m0 + 64 k1 + 128 m2 + 512 ma + 512 (Mp/64) ka``
  (CuTe: atom ``((8,2,4),(16,2,4)) : ((128,16,2048),(1,1024,32))`` in logical elements, atoms M-first).
- scale: the per-token norm scale ``[M]`` (float32), :func:`rtlynx.reference.nm.norm_scale`.

The optional LoRA tail (see ``rtlynx.ops``) appends ``2r`` logical columns after ``Kp``; it is described by
:func:`lora_tail` and :func:`expand_lora_b`.
"""

from __future__ import annotations

import torch

from .nm import centred, compress, decompress, norm_scale, prune_nm
from .producers import gelu_tanh

ATOM_M = 64
ATOM_K = 128


def round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def padded_shape(m: int, k: int) -> tuple[int, int]:
    """(Mp, Kp) of the sm90 layout for an [m, k] activation."""
    return round_up(max(m, 1), ATOM_M), round_up(k, ATOM_K)


def _word_permutation(mp: int, kp: int, device=None) -> torch.Tensor:
    """dest[i] for the i-th 16-bit word of the row-major [Mp, Kp/16] rows-layout word matrix."""
    m = torch.arange(mp, device=device).view(-1, 1)
    kw = torch.arange(kp // 16, device=device).view(1, -1)
    m0, m1, m2, ma = m % 8, (m // 8) % 2, (m // 16) % 4, m // 64
    k1, k2, ka = kw % 2, (kw // 2) % 4, kw // 8
    dest = m1 + 2 * k2 + 8 * m0 + 64 * k1 + 128 * m2 + 512 * ma + 512 * (mp // 64) * ka
    return dest.reshape(-1)


def rows_meta_to_sm90(meta_rows: torch.Tensor) -> torch.Tensor:
    """Rows-layout 2:4 metadata ``[Mp, Kp/8]`` uint8 (Mp % 64 == 0, Kp % 128 == 0) -> sm90 bytes ``[Mp*Kp/8]``."""
    mp, nbytes = meta_rows.shape
    kp = nbytes * 8
    if meta_rows.dtype != torch.uint8 or mp % ATOM_M or kp % ATOM_K:
        raise ValueError(f"need uint8 [Mp, Kp/8] with Mp % 64 == 0 and Kp % 128 == 0, got {tuple(meta_rows.shape)}")
    words = meta_rows.contiguous().view(torch.int16).reshape(-1)  # little-endian pairs of bytes
    out = torch.empty_like(words)
    out[_word_permutation(mp, kp, meta_rows.device)] = words
    return out.view(torch.uint8)


def sm90_meta_to_rows(meta: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """Inverse of :func:`rows_meta_to_sm90` for an [m, k] activation: rows-layout bytes ``[Mp, Kp/8]``."""
    mp, kp = padded_shape(m, k)
    if meta.dtype != torch.uint8 or meta.numel() != mp * kp // 8:
        raise ValueError(f"sm90 metadata for [{m}, {k}] must be uint8 with {mp * kp // 8} bytes, got {meta.numel()}")
    words = meta.contiguous().view(torch.int16).reshape(-1)
    rows = words[_word_permutation(mp, kp, meta.device)]
    return rows.view(torch.uint8).reshape(mp, kp // 8)


def compress_sm90(x: torch.Tensor, n: int = 2, m: int = 4, eps: float = 1e-8):
    """Reference of ``rtlynx::prune_compress_sm90``: ``(values [M, Kp/2], meta [Mp*Kp/8] uint8, scale [M] f32)``
    for a 2-D ``x [M, K]`` of a 16-bit float dtype."""
    if (n, m) != (2, 4):
        raise ValueError(f"the sm90 layout is 2:4 only, got {n}:{m}")
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [M, K] activation, got {tuple(x.shape)}")
    if x.element_size() != 2 or not x.is_floating_point():
        raise TypeError(f"the sm90 layout holds 16-bit floats, got {x.dtype}")
    rows, k = x.shape
    mp, kp = padded_shape(rows, k)
    xp = torch.nn.functional.pad(x, (0, kp - k, 0, mp - rows))
    values, meta_rows = compress(xp, 2, 4)
    return values[:rows].contiguous(), rows_meta_to_sm90(meta_rows), norm_scale(x, eps=eps)


def gelu_compress_sm90(h: torch.Tensor, eps: float = 1e-8, dense: bool = False):
    """Reference of ``rtlynx::gelu_prune_compress_sm90``: :func:`compress_sm90` of ``x = gelu_tanh(h)`` (GELU-tanh
    in float32, rounded once to h's dtype: :func:`rtlynx.reference.producers.gelu_tanh`), i.e.
    ``(values, meta, scale)``, plus the dense ``x [M, K]`` when ``dense``."""
    x = gelu_tanh(h)
    out = compress_sm90(x, eps=eps)
    return (*out, x) if dense else out


def decompress_sm90(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """Dense pruned ``[M, k]`` from sm90 ``values [M, >= Kp/2]`` and ``meta`` (inverse of the packing)."""
    rows = values.shape[0]
    mp, kp = padded_shape(rows, k)
    meta_rows = sm90_meta_to_rows(meta, rows, k)[:rows]
    return decompress(values[:, : kp // 2].contiguous(), meta_rows.contiguous(), 2, 4)[:, :k]


# The LoRA tail's 2:4 groups keep slots 0 and 2 (nibble 0b1000): tail value t sits at logical column Kp + 2t, so
# B's column t is B-expanded's column Kp + 2t and ``lora_B`` can be a plain strided view (column stride 2) of the
# GEMM operand instead of a second copy (rtlynx.sites). Slots 1 and 3 of every tail group are never read.
TAIL_NIBBLE = 0b1000
TAIL_META_BYTE = TAIL_NIBBLE | TAIL_NIBBLE << 4


def expand_lora_b(weight: torch.Tensor, lora_b: torch.Tensor | None, k: int) -> torch.Tensor:
    """The B operand of the fused GEMM: ``[N, Kp + 2r']`` = ``[W zero-padded to Kp | B expanded]`` where
    r' = round_up(r, 64) and B's column t sits at logical column Kp + 2t (tail group t // 2 keeps slots 0 and 2);
    the other tail columns are zero."""
    n = weight.shape[0]
    kp = round_up(k, ATOM_K)
    wpad = torch.nn.functional.pad(weight, (0, kp - weight.shape[1]))  # k may exceed W's K (x padded to 8)
    if lora_b is None:
        return wpad.contiguous()
    r = lora_b.shape[1]
    rp = round_up(r, 64)
    tail = torch.zeros(n, 2 * rp, dtype=weight.dtype, device=weight.device)
    tail[:, 0 : 2 * r : 2] = lora_b.to(weight.dtype)
    return torch.cat([wpad, tail], dim=1).contiguous()


def lora_tail(h: torch.Tensor, scale: torch.Tensor | None):
    """Reference of the LoRA tail the prune kernel appends: values ``[M, r']`` (h / s rounded to h's dtype,
    zero-padded to r' = round_up(r, 64)); every tail group's rows-layout meta nibble is ``TAIL_NIBBLE`` (slots 0, 2)."""
    r = h.shape[1]
    rp = round_up(r, 64)
    hf = torch.nn.functional.pad(h, (0, rp - r)).float()
    if scale is not None:
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        hf = hf * inv.unsqueeze(1)
    return hf.to(h.dtype)


def tail_dense(tail_values: torch.Tensor) -> torch.Tensor:
    """The logical (decompressed) tail ``[M, 2r']`` of tail values ``[M, r']``: value t at column 2t, zeros between."""
    m, rp = tail_values.shape
    out = tail_values.new_zeros(m, 2 * rp)
    out[:, 0::2] = tail_values
    return out


LAYOUT = compress_sm90


def centred_operand(x: torch.Tensor, centre: torch.Tensor, centre_rows: torch.Tensor) -> torch.Tensor:
    """``[x - c; centre_rows]``: the rows a centred site's prune kernel reads (``rtlynx_prune_compress_centred_sm90``,
    the FP8 one alike): the M token rows of x (B samples of consecutive tokens) minus their sample's centre
    (``centre`` float32 [B, K], :func:`rtlynx.reference.nm.centred`), then ``centre_rows`` [R, K] as given."""
    per = x.shape[0] // centre.shape[0]
    return torch.cat([centred(x, centre.repeat_interleave(per, 0)), centre_rows.to(x.dtype)])


def centred_tail(x: torch.Tensor, lora_a: torch.Tensor, centre: torch.Tensor, centre_rows: torch.Tensor) -> torch.Tensor:
    """The LoRA tail's ``h`` of a centred site, ``[x - c; centre_rows] lora_a^T``, as the site ops compute it without
    writing x - c: ``x A^T - c A^T`` per sample (each product rounded to x's dtype, as cuBLAS), then the rows'."""
    per = x.shape[0] // centre.shape[0]
    a = lora_a.to(x.dtype)
    ca = torch.nn.functional.linear(centre.to(x.dtype), a).repeat_interleave(per, 0)
    return torch.cat([torch.nn.functional.linear(x, a) - ca, torch.nn.functional.linear(centre_rows.to(x.dtype), a)])


def site_linear_sm90(x: torch.Tensor, wext: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor | None,
                     norm: bool = True, eps: float = 1e-8, centre: torch.Tensor | None = None,
                     centre_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``rtlynx::sparse_site_sm90`` (one activation site, :mod:`rtlynx.sites`), in float32 from the
    operands the kernels see: ``y = s * ([prune24(x) | 0 | tail(h / s)] @ wext^T) + bias`` with ``h = x lora_a^T``
    rounded to x's dtype (cuBLAS), the tail values as :func:`lora_tail` and laid out as :func:`tail_dense`, and the
    result rounded to x's dtype. ``wext [N, Kp + 2 rp]``, ``lora_a [rp, K]`` or None (then only ``wext[:, :Kp]``).
    ``centre`` / ``centre_rows``: the rows are :func:`centred_operand`'s and h is :func:`centred_tail`'s."""
    k = x.shape[1]
    xo = x if centre is None else centred_operand(x, centre, centre_rows)
    m = xo.shape[0]
    kp = round_up(k, ATOM_K)
    s = norm_scale(xo, eps=eps) if norm else torch.ones(m, dtype=torch.float32, device=x.device)
    xl = torch.nn.functional.pad(prune_nm(xo, 2, 4), (0, kp - k)).float()
    if lora_a is not None:
        h = (torch.nn.functional.linear(x, lora_a.to(x.dtype)) if centre is None
             else centred_tail(x, lora_a, centre, centre_rows))
        xl = torch.cat([xl, tail_dense(lora_tail(h, s if norm else None)).float()], 1)
    y = s.unsqueeze(1) * (xl @ wext[:, : xl.shape[1]].float().T)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
