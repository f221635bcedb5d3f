"""N:M pruning, compression and compensation: the pure-torch ground truth.

Every kernel in rtlynx is tested against these functions. They run on any device and any float dtype
and never change the dtype of the values they keep.

Conventions (shared with the kernels):
- Groups are ``m`` consecutive elements along the last dim. A group keeps the ``n`` elements with the
  largest magnitude. The ranking key is ``|x|`` with NaN counted as +inf, so a NaN is always kept and
  propagates to the output. Ties go to the lower index (deterministic, independent of sort algorithms).
- Kept values are stored in index order inside their group.
- Metadata ("rows" layout): the in-group index of every kept element, ``b`` bits each (``b = 2`` for
  ``m <= 4``, ``b = 4`` for ``m <= 16``), packed little-endian into uint8 along the last dim: the first
  kept element of a row sits in the lowest bits of byte 0. For 2:4 this is exactly the PTX sparse
  metadata nibble per group of 4 (``idx0 | idx1 << 2``, ``idx0 < idx1``), two groups per byte.
  The byte count per row is ``ceil(kept_per_row * b / 8)``; padding bits are zero.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_M = (2, 4, 8, 16)


def check_pattern(n: int, m: int) -> None:
    """Raise a clear ValueError for an unsupported N:M pattern."""
    if not (isinstance(n, int) and isinstance(m, int)) or isinstance(n, bool) or isinstance(m, bool):
        raise TypeError(f"N:M pattern must be two ints, got n={n!r}, m={m!r}")
    if m not in SUPPORTED_M:
        raise ValueError(f"m must be one of {SUPPORTED_M}, got m={m}")
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m for an N:M pattern, got {n}:{m}")


def _check_input(x: torch.Tensor, m: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"N:M pruning needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("N:M pruning needs at least one dimension")
    if x.shape[-1] % m != 0:
        raise ValueError(
            f"last dim {x.shape[-1]} is not a multiple of m={m}; pad it (rtlynx.reference.pad_to_multiple) "
            "or keep this layer dense"
        )


def ranking_key(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN mapped to +inf: the magnitude every N:M selection in rtlynx ranks by."""
    a = x.abs()
    return torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a)


_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}
# bits of +inf per dtype, as Python ints (a constant, so torch.compile traces _order_bits without a break)
_INF_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000,
             torch.float64: 0x7FF0000000000000}


def _order_bits(key: torch.Tensor) -> torch.Tensor:
    """Integers that order like the ranking key: for non-negative floats the bit pattern is monotone in
    the value, so ``bits(|x|)`` clamped at ``bits(+inf)`` (NaN bits sit above it) ranks as ``ranking_key``."""
    if key.dtype not in _INT_VIEW:
        key = key.float()
    itype = _INT_VIEW[key.dtype]
    return key.abs().view(itype).clamp(max=_INF_BITS[key.dtype])


def nm_mask(x: torch.Tensor, n: int = 2, m: int = 4, score: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask keeping the ``n`` highest-scoring of every ``m`` consecutive elements of the last dim.

    ``score`` defaults to ``|x|``; pass e.g. a Wanda score to rank weights differently. NaN ranks as
    +inf and ties go to the lower index.
    """
    check_pattern(n, m)
    _check_input(x, m)
    key = x if score is None else score.to(x.device)
    if key.shape != x.shape:
        raise ValueError(f"score shape {tuple(key.shape)} != x shape {tuple(x.shape)}")
    bits = _order_bits(key)
    # CUDA's top-k over millions of 4-wide slices was 4x slower than m compare passes. On the CPU one comparison
    # per pair of group members is 5-10x faster than top-k (2:4, 4096 x 3072: 14 vs 143 ms fp32, 13 vs 99 ms bf16).
    return (_mask_compare if bits.is_cuda else _mask_pairs)(bits, n, m).reshape(x.shape)


def _mask_topk(bits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Unique keys (bits, then lower index first) make top-n exact and deterministic."""
    wide = torch.int32 if bits.dtype == torch.int16 else torch.int64
    pos = torch.arange(m, device=bits.device)
    g = bits.to(wide).reshape(*bits.shape[:-1], bits.shape[-1] // m, m) * m + (m - 1 - pos).to(wide)
    idx = g.topk(n, dim=-1, sorted=False).indices
    return torch.zeros(g.shape, dtype=torch.bool, device=bits.device).scatter_(-1, idx, True)


def _mask_pairs(bits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The same ranks as _mask_compare from one comparison per pair i < j of a group's members (j beats i only
    when strictly larger: a tie goes to the lower index), on [..., G] column views."""
    g = bits.reshape(*bits.shape[:-1], bits.shape[-1] // m, m)
    ranks: list[torch.Tensor | None] = [None] * m
    for i in range(m):
        for j in range(i + 1, m):
            j_wins = g[..., j] > g[..., i]
            ranks[i] = j_wins.to(torch.uint8) if ranks[i] is None else ranks[i] + j_wins
            ranks[j] = (~j_wins).to(torch.uint8) if ranks[j] is None else ranks[j] + ~j_wins
    return torch.stack([r < n for r in ranks], dim=-1)


def _mask_compare(bits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """rank_i = #{j: k_j > k_i} + #{j < i: k_j == k_i}; keep rank < n."""
    pos = torch.arange(m, device=bits.device)
    g = bits.reshape(*bits.shape[:-1], bits.shape[-1] // m, m)  # (not -1: ambiguous for 0 rows)
    rank = torch.zeros(g.shape, dtype=torch.int8, device=bits.device)
    for j in range(m):
        kj = g[..., j:j + 1]
        rank += (kj > g) | ((kj == g) & (pos > j))
    return rank < n


def prune_nm(x: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """x with all but the ``n`` largest-|x| of every ``m`` elements set to zero (same dtype and shape)."""
    mask = nm_mask(x, n, m)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def meta_bits(m: int) -> int:
    """Bits per stored in-group index in the "rows" metadata layout."""
    return 2 if m <= 4 else 4


def meta_bytes_per_row(k: int, n: int, m: int) -> int:
    return math.ceil((k // m) * n * meta_bits(m) / 8)


def compress(x: torch.Tensor, n: int = 2, m: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and pack: returns ``values [..., K*n/m]`` (x's dtype) and ``meta [..., bytes]`` (uint8).

    See the module docstring for the metadata layout.
    """
    mask = nm_mask(x, n, m)
    k = x.shape[-1]
    lead = x.shape[:-1]
    gm = mask.reshape(*lead, k // m, m)
    # In-group positions of the kept elements, ascending: sort positions with dropped ones pushed last.
    pos = torch.arange(m, device=x.device).expand_as(gm)
    order = torch.where(gm, pos, pos + m).sort(dim=-1).values[..., :n]  # [..., G, n], in-group index
    values = torch.gather(x.reshape(*lead, k // m, m), -1, order).reshape(*lead, k // m * n)
    return values, _pack_indices(order.reshape(*lead, k // m * n), meta_bits(m))


def _pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    cnt = idx.shape[-1]
    pad = (-cnt) % per_byte
    if pad:
        idx = torch.nn.functional.pad(idx, (0, pad))
    idx = idx.to(torch.int32).reshape(*idx.shape[:-1], idx.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=idx.device, dtype=torch.int32) * bits
    return (idx << shifts).sum(-1).to(torch.uint8)


def _unpack_indices(meta: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=meta.device, dtype=torch.int32) * bits
    idx = (meta.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return idx.reshape(*meta.shape[:-1], meta.shape[-1] * per_byte)[..., :count].to(torch.int64)


def decompress(values: torch.Tensor, meta: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Inverse of :func:`compress`: the dense pruned tensor ``[..., K]``."""
    check_pattern(n, m)
    if meta.dtype != torch.uint8:
        raise TypeError(f"metadata must be uint8, got {meta.dtype}")
    kept = values.shape[-1]
    if kept % n:
        raise ValueError(f"values last dim {kept} is not a multiple of n={n}")
    groups = kept // n
    k = groups * m
    if meta.shape[:-1] != values.shape[:-1] or meta.shape[-1] != meta_bytes_per_row(k, n, m):
        raise ValueError(
            f"metadata shape {tuple(meta.shape)} does not match values {tuple(values.shape)} for {n}:{m}"
        )
    idx = _unpack_indices(meta, meta_bits(m), kept).reshape(*values.shape[:-1], groups, n)
    if bool((idx >= m).any()):
        raise ValueError("corrupt metadata: in-group index >= m")
    out = torch.zeros(*values.shape[:-1], groups, m, dtype=values.dtype, device=values.device)
    out.scatter_(-1, idx, values.reshape(*values.shape[:-1], groups, n))
    return out.reshape(*values.shape[:-1], k)


def norm_scale(x: torch.Tensor, x_pruned: torch.Tensor | None = None, n: int = 2, m: int = 4,
               eps: float = 1e-8) -> torch.Tensor:
    """Per-token compensation ``s = sqrt(|x|^2 / (|x~|^2 + eps))`` over the last dim, in float32.

    s lies in [1, sqrt(m/n)] for finite non-zero rows, so it can scale the GEMM output row instead of
    the packed values. NaN/Inf rows give NaN/Inf scales (propagated, not hidden).

    Each row is divided by a power of two p near its largest |x| before squaring, ``s = sqrt(|x/p|^2 /
    (|x~/p|^2 + eps/p^2))``: the squares of bf16 values above ~1.8e19 overflow float32 (|x|^2 = inf, s = NaN where
    the dense layer is finite). Dividing by a power of two is exact, so wherever the plain formula neither
    overflows nor underflows the result is the same, bit for bit.
    """
    if x_pruned is None:
        x_pruned = prune_nm(x, n, m)
    xf = x.float()
    pf = x_pruned.float()
    amax = xf.abs().amax(-1, keepdim=True) if xf.shape[-1] else xf.new_zeros(*xf.shape[:-1], 1)
    mant, _ = torch.frexp(amax)  # amax = mant * 2^e, mant in [0.5, 1): p = 2^(e-1) = amax / (2 mant), exact
    ok = torch.isfinite(amax) & (amax > 0)
    p = torch.where(ok, amax / torch.where(ok, 2 * mant, 1.0), 1.0)  # NaN / Inf / zero rows: p = 1 (as before)
    xs, ps = xf / p, pf / p
    eps_s = eps / p.squeeze(-1) / p.squeeze(-1)  # two exact steps (p^2 alone can overflow)
    return torch.sqrt((xs * xs).sum(-1) / ((ps * ps).sum(-1) + eps_s))


def pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    """Zero-pad the last dim up to a multiple of ``m`` (a zero never displaces a real value's slot
    unless the real values of the group number fewer than n)."""
    pad = (-x.shape[-1]) % m
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def prune_weight_magnitude(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Baseline: magnitude N:M on W [N, K] along K (what weight-sparse 2:4 kernels run)."""
    return prune_nm(weight, n, m)


def wanda_score(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance |W_ij| * ||X_j||_2 with ``act_norm`` the per-input-channel L2 norm [K]."""
    if act_norm.shape != weight.shape[-1:]:
        raise ValueError(f"act_norm must have shape [{weight.shape[-1]}], got {tuple(act_norm.shape)}")
    return weight.abs().float() * act_norm.to(weight.device).float()


def prune_weight_wanda(weight: torch.Tensor, act_norm: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Baseline: Wanda N:M on W along K, ranking by :func:`wanda_score`."""
    mask = nm_mask(weight, n, m, score=wanda_score(weight, act_norm))
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def channel_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every input channel (last dim) over all tokens, float32 [K]: Wanda's calibration stat."""
    return x.float().reshape(-1, x.shape[-1]).pow(2).sum(0).sqrt()


def centred(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``x - centre`` computed in float32 and rounded once to x's dtype (what a prune kernel that subtracts a float32
    centre before its selection writes). ``centre`` broadcasts against x: ``[K]`` or ``[..., 1, K]``."""
    if centre.shape[-1] != x.shape[-1]:
        raise ValueError(f"centre has {centre.shape[-1]} features, x has {x.shape[-1]}")
    return (x.float() - centre.float()).to(x.dtype)


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """The centre that pays most on the mini-FLUX (benchmarks/centering_probe.py): the mean over the tokens of each
    sample, float32 ``[..., 1, K]`` (a 2-D x is one sample: ``[1, K]``; a 1-D x is one token, its own mean)."""
    if x.dim() == 1:
        return x.float()
    return x.float().mean(-2, keepdim=True)


def row_centres(x: torch.Tensor) -> torch.Tensor:
    """:func:`token_mean` repeated for each token: float32 ``[rows, K]``, one centre per row of ``x.reshape(-1, K)``
    (what the per-layer paths pass as ``centre``)."""
    return token_mean(x).expand(x.shape).reshape(-1, x.shape[-1])


def centre_rows(c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The centres ``c`` ([..., K], one per sample) rounded to ``dtype`` and each split into two rows that are already
    2:4, ``[c_a; c_b]`` ``[2B, K]`` (c_a keeps positions 0, 1 of every group of 4, c_b positions 2, 3; B samples first
    all c_a, then all c_b): a 2:4 prune keeps them whole, their norm scale is 1 up to eps, and
    ``c_a W^T + c_b W^T = c W^T``, so a site GEMM over ``[x - c; c_a; c_b]`` computes the centre's output too."""
    cb = c.to(dtype).reshape(-1, c.shape[-1])
    first = (torch.arange(c.shape[-1], device=c.device) % 4 < 2).expand_as(cb)
    zero = torch.zeros((), dtype=dtype, device=c.device)
    return torch.cat([torch.where(first, cb, zero), torch.where(first, zero, cb)])


def sparse_act_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      n: int = 2, m: int = 4, compensation: str = "norm",
                      lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                      eps: float = 1e-8, compute_dtype: torch.dtype | None = None,
                      centre: torch.Tensor | None = None) -> torch.Tensor:
    """The RT-Lynx layer: ``y = s * (prune(x) @ W^T) + b + (x @ A^T) @ B^T``.

    ``s`` is the per-token norm scale (``compensation="norm"``) or 1 (``"none"``); the LoRA branch
    runs on the dense x. ``compute_dtype=torch.float32`` gives the fp32 product kernels are checked
    against; by default the math runs in x's dtype like the layer would. Output has x's dtype.

    ``centre`` (float32, broadcast against x, e.g. :func:`token_mean`): prune ``x - c`` instead of x and add
    ``c @ W^T`` back, ``y = s * (prune(x - c) @ W^T) + c @ W^T + b + (x @ A^T) @ B^T`` with s the norm scale of
    ``x - c``. Exact for any c wherever ``x - c`` is already N:M sparse; a c that removes the offset the tokens share
    leaves less for the pruning to throw away.
    """
    if compensation not in ("none", "norm"):
        raise ValueError(f"compensation must be 'none' or 'norm', got {compensation!r}")
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x last dim {x.shape[-1]} != weight in_features {weight.shape[-1]}")
    cd = compute_dtype or x.dtype
    xs = x if centre is None else centred(x, centre)
    xp = prune_nm(xs, n, m)
    y = torch.nn.functional.linear(xp.to(cd), weight.to(cd))
    if compensation == "norm":
        y = y * norm_scale(xs, xp, eps=eps).to(cd).unsqueeze(-1)
    if centre is not None:
        y = y + torch.nn.functional.linear(centre.to(cd), weight.to(cd))
    if bias is not None:
        y = y + bias.to(cd)
    if lora_a is not None and lora_b is not None:
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(x.to(cd), lora_a.to(cd)), lora_b.to(cd))
    return y.to(x.dtype)
