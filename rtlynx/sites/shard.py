"""Tensor-parallel shards of sparse layers and the row-parallel site forward (the math of rtlynx.parallel).

What a split must satisfy (check_split), which layers a sharded model split and how (layer_shards, site_shard), and
a row-parallel site's forward: partial outputs summed over the ranks with the norm scale of the whole K (see
rtlynx.parallel for the whole story).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends, ops, reference
from ..families import family_of
# The lynx prune kernel reads K in steps of 8 (rtlynx.ops.prune_compress): a row-parallel shard on the GPU kernels
# must be a multiple of it.
LYNX_K_MULTIPLE = 8
STYLES = ("colwise", "rowwise")


@dataclass(frozen=True, eq=False)
class Shard:
    """How tensor parallelism split one sparse layer: ``style`` "colwise" (W's rows, N) or "rowwise" (W's columns,
    K); ``blocks`` the sizes of the independently split blocks of the full dimension (one, or a packed layer's
    parts); ``group`` / ``rank`` / ``size`` the tensor-parallel process group, this rank's index in it, its size."""

    style: str
    blocks: tuple[int, ...]
    group: object
    rank: int
    size: int

    def local_slices(self) -> list[slice]:
        """This rank's ranges of the full dimension (one per block; concatenated they are the local tensor)."""
        out, off = [], 0
        for b in self.blocks:
            c = b // self.size
            out.append(slice(off + self.rank * c, off + (self.rank + 1) * c))
            off += b
        return out

    def local(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's part of ``full`` (an unsharded tensor) along ``dim``."""
        parts = [full.narrow(dim, s.start, s.stop - s.start) for s in self.local_slices()]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).contiguous()


def check_split(name: str, style: str, blocks, size: int, config, cuda: bool) -> None:
    """Raise ValueError if a sparse layer split this way cannot give the single-GPU result (or cannot run on the
    kernels it would use)."""
    if style not in STYLES:
        raise ValueError(f"rtlynx: {name}: unsupported tensor-parallel split {style!r} (expected {STYLES})")
    if style == "colwise":
        return
    k = sum(blocks)
    unit = config.m * size
    if any(b % unit for b in blocks):
        raise ValueError(
            f"rtlynx: {name}: K={k} (blocks {list(blocks)}) split over {size} tensor-parallel ranks leaves shards that "
            f"are not whole groups of {config.m}: every block must be a multiple of m x tp = {unit}, or groups would "
            f"straddle a shard boundary. Keep this layer dense (exclude=[{name!r}]) or use another tp_degree")
    if not family_of(config.dtype).splits_k:
        raise ValueError(f"rtlynx: {name}: dtype='fp8' scales each token over its whole K, which a row-parallel "
                         f"split does not have; use dtype='native' or exclude the row-parallel layers")
    local_k = k // size
    if (cuda and (config.n, config.m) == (2, 4) and config.backend in ("auto", "lynx")
            and local_k % LYNX_K_MULTIPLE):
        raise ValueError(f"rtlynx: {name}: the K shard {local_k} (K={k} over {size} ranks) is not a multiple of "
                         f"{LYNX_K_MULTIPLE}, which the lynx prune kernel needs; use another tp_degree, "
                         f"backend='reference', or exclude this layer")


# ---------------------------------------------------------------------------------------------- sharded models
def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor  # lazy: torch.distributed is optional and slow to import

    return isinstance(t, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds tensor-parallel layers (DTensor weights, or sparse layers split by rtlynx)."""
    return any(getattr(m, "_tp", None) is not None or _is_dtensor(getattr(m, "weight", None))
               for m in module.modules())


def refuse_sharded(module: nn.Module, action: str) -> None:
    if is_sharded(module):
        raise ValueError(f"{action} needs the unsharded model, and this one is split by tensor parallelism (its "
                         f"sparse layers hold this rank's shards): {action} before model.enable_parallelism(...), "
                         f"or on a model built again (rtlynx.configure(model, mode='dense') runs it dense)")


def plan_specs(module: nn.Module, size: int) -> dict:
    """{param name: (dim, block sizes)} of the model's ``_tp_plan`` (diffusers' own reading of it), {} without one."""
    plan = getattr(module, "_tp_plan", None)
    if not plan:
        return {}
    try:
        from diffusers.hooks.tensor_parallel import resolve_tp_shard_specs
    except ImportError as e:
        raise RuntimeError(f"rtlynx reads a model's _tp_plan through diffusers' resolve_tp_shard_specs (diffusers "
                           f">= 0.42), which this diffusers lacks ({e})") from e

    return {k: (v.dim, tuple(v.block_sizes or ())) for k, v in resolve_tp_shard_specs(module, plan, size).items()}


def split_style(dim) -> str | None:
    return {0: "colwise", 1: "rowwise"}.get(dim)


def layer_shards(module: nn.Module, names: list[str], config) -> dict[str, Shard]:
    """{name: Shard} for the layers among ``names`` whose weight tensor parallelism made a DTensor; {} for an unsharded
    model. Every split is checked (:func:`check_split`) before anything changes."""
    from torch.distributed.tensor import Shard as DShard

    sharded = [n for n in names if _is_dtensor(module.get_submodule(n).weight)]
    if not sharded:
        return {}
    w0 = module.get_submodule(sharded[0]).weight
    specs = plan_specs(module, w0.device_mesh.size())
    out = {}
    for name in sharded:
        w = module.get_submodule(name).weight
        mesh = w.device_mesh
        if mesh.ndim != 1 or len(w.placements) != 1 or not isinstance(w.placements[0], DShard):
            raise ValueError(f"rtlynx: {name}: weight placement {w.placements} on mesh {tuple(mesh.shape)}; a sparse "
                             "layer takes a 1-D tensor-parallel split of rows or columns (Shard(0) / Shard(1))")
        dim = w.placements[0].dim % 2
        spec_dim, blocks = specs.get(f"{name}.weight", (dim, ()))
        if spec_dim != dim:
            raise ValueError(f"rtlynx: {name}: the weight is split along dim {dim}, the model's _tp_plan says "
                             f"{spec_dim}")
        blocks = blocks or (w.shape[dim],)
        check_split(name, split_style(dim), blocks, mesh.size(), config, w.device.type == "cuda")
        out[name] = Shard(split_style(dim), tuple(blocks), mesh.get_group(), mesh.get_local_rank(), mesh.size())
    return out


def localize(linear: nn.Linear) -> nn.Linear:
    """A plain nn.Linear holding this rank's shard of a tensor-parallel Linear (no DTensor, no TP hooks)."""
    w, b = linear.weight, linear.bias
    wl = w.to_local().detach()
    new = nn.Linear(wl.shape[1], wl.shape[0], bias=b is not None, device="meta", dtype=wl.dtype)
    new.weight = nn.Parameter(wl, requires_grad=w.requires_grad)
    if b is not None:
        new.bias = nn.Parameter((b.to_local() if _is_dtensor(b) else b).detach(), requires_grad=b.requires_grad)
    return new


def site_shard(layers, name: str) -> Shard | None:
    """The one tensor-parallel split of a site's layers (None: not split)."""
    shards = [getattr(l, "_tp", None) for l in layers]
    first = shards[0]
    if all(s is None for s in shards):
        return None
    if any(s is None or s.style != first.style or s.group is not first.group for s in shards):
        raise ValueError(f"site {name!r}: its layers are split differently by tensor parallelism "
                         f"{[None if s is None else s.style for s in shards]}")
    return first


# ---------------------------------------------------------------------------------------------- row-parallel math
def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``t`` over ``group`` (functional collective: traceable by torch.compile)."""
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_reduce(t, "sum", group)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def _sq(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32).square()  # float32 sums, no float copy of t


def global_norm_scale(x: torch.Tensor, kept: torch.Tensor, eps: float, group) -> torch.Tensor:
    """``s [M]`` (float32) of the whole K from this rank's shard: ``sqrt(sum_r |x_r|^2 / (sum_r |x~_r|^2 + eps))``.
    ``kept`` is x pruned (dense, zeros dropped) or its compressed values: only their squares count."""
    sums = all_reduce(torch.stack([_sq(x), _sq(kept)]), group)
    return torch.sqrt(sums[0] / (sums[1] + eps))


def _row_lynx(site, layer, x2, cfg) -> bool:
    return (layer.backend in ("auto", "lynx") and x2.is_cuda and x2.shape[0] > 0 and (cfg.n, cfg.m) == (2, 4)
            and site.wext is not None and x2.dtype == site.wext.dtype and site.k % LYNX_K_MULTIPLE == 0 and layer.out_features % 8 == 0
            and backends._lynx_ok(backends._device_index(x2)))


def _row_sparse(site, layer, x2, cfg) -> torch.Tensor:
    """This rank's partial ``s * (prune(x_r) @ W_r^T)`` with the global s (no bias, no LoRA)."""
    norm = layer.compensation == "norm"
    group = site.tp.group
    if _row_lynx(site, layer, x2, cfg):
        try:
            values, meta, _ = ops.prune_compress(x2 if x2.is_contiguous() else x2.contiguous(), cfg.eps)
            s = global_norm_scale(x2, values, cfg.eps, group) if norm else None
            w = site._wext_nolora if len(site.layers) == 1 else site._wext_nolora[site.slices[layer._slot]]
            return ops.sparse_gemm(values, meta, w, s, None)
        except ops.Unsupported as e:
            backends.warn_once(f"row:{e}", f"rtlynx: row-parallel site {site.name!r} cannot run on the lynx kernels "
                                           f"({e}); running it on the reference path")
    elif x2.is_cuda and layer.backend != "reference":
        backends.warn_once(f"row:{site.name}", f"rtlynx: row-parallel site {site.name!r} runs on the reference path "
                                               "(only the lynx kernels take a tensor-parallel norm scale here)")
    xp = reference.prune_nm(x2, cfg.n, cfg.m)
    y = F.linear(xp, layer.weight)
    if norm:
        y = y * global_norm_scale(x2, xp, cfg.eps, group).to(y.dtype).unsqueeze(-1)
    return y


def row_forward(site, layer, x: torch.Tensor) -> torch.Tensor:
    """A row-parallel sparse layer on this rank's slice of K: the partial outputs of every mode (sparse, dense,
    weight) are summed over the ranks, then the bias is added once."""
    cfg = layer._settings.config
    if not family_of(cfg.dtype).splits_k:
        raise RuntimeError(f"rtlynx: site {site.name!r} is row-parallel, and dtype='fp8' scales each token over its "
                           "whole K: configure(model, dtype='native') for a tensor-parallel model")
    x2 = x.reshape(-1, site.k)
    mode = layer.mode
    if mode == "dense" or (layer._step_gate is not None and layer._step_gate.dense) or \
            site._speed_dense(cfg, layer.backend, x2):
        y = F.linear(x2, layer.weight)
    elif mode == "weight":
        y = F.linear(x2, layer._pruned_weight())
    else:
        if not torch.compiler.is_compiling():
            site.ensure()
        y = _row_sparse(site, layer, x2, cfg)
        if layer.lora_enabled and layer.lora_A is not None:  # (x_r A_r^T) B^T: its sum over ranks is x A^T B^T
            y = y + F.linear(F.linear(x2, layer.lora_A), layer.lora_B)
    y = all_reduce(y, site.tp.group)
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*x.shape[:-1], layer.out_features)
