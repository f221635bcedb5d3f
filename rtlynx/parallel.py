"""More than one GPU: sparsified transformers under diffusers' own context and tensor parallelism.

**Context parallelism** (``model.enable_parallelism(config=ContextParallelConfig(ring_degree= / ulysses_degree=))``):
the model's ``_cp_plan`` splits the sequence at the model's inputs and gathers it at ``proj_out``; every linear
layer runs whole on its rank's tokens. Pruning and the norm scale are per token, so every sparse site prunes its own
tokens and the output is the single-GPU output (up to the attention's order of summation). Nothing here is needed
for it: sparsify before or after ``enable_parallelism``.

**Tensor parallelism** (``TensorParallelConfig(tp_degree=)``, the model's ``_tp_plan``; torch DTensor underneath):

- column-parallel layers (weight split along N): the input stays whole; a sparse layer holds its rank's rows of W
  as a plain tensor and runs as on one GPU (the site prunes the whole input once).
- row-parallel layers (weight split along K, the input is this rank's slice of K): this rank computes
  ``s * (prune(x_r) @ W_r^T) [+ (x_r A_r^T) B^T]``, the ranks' partial outputs are summed (all-reduce) and the bias
  is added once. Two conditions make it the single-GPU result: every block of the split K (one block; two for
  FLUX's packed single-block ``proj_out``) is a multiple of ``m x tp``, so each rank's groups of m are exactly
  single-GPU groups (otherwise ``ValueError``); and ``s = sqrt(sum_r |x_r|^2 / (sum_r |x~_r|^2 + eps))`` uses the
  sums over all ranks (one all-reduce of two floats per token, before the GEMM's epilogue applies s).
  The sums are accumulated in float32 without the per-row rescaling of :func:`rtlynx.reference.norm_scale`: a token
  with entries above ~1e19 gets a NaN scale here (loud, not wrong), where one GPU rescales.

The sparse layers hold plain local tensors (the kernels take no DTensor) and run their own collectives; the dense
planned layers keep diffusers' DTensor hooks.

**Order.** ``rtlynx.sparsify`` first, then ``model.enable_parallelism(...)``: sparsify puts a wrapper of
``enable_parallelism`` on the model that, for tensor parallelism, checks every sparse layer's split, un-sparsifies,
lets diffusers shard the plain model (rank 0's weights are broadcast) and sparsifies the sharded model again with the
same config, LoRA weights (rank 0's, sliced) and per-layer overrides. ``sparsify`` also takes a model that is already
sharded (``from_pretrained(..., parallel_config=...)``). ``rtlynx.save`` / ``load`` / ``unsparsify`` need the
unsharded model (they raise on a tensor-parallel one).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, reference

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
    if config.dtype == "fp8":
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
    from torch.distributed.tensor import DTensor

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


def _plan_specs(module: nn.Module, size: int) -> dict:
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


def _style(dim) -> str | None:
    return {0: "colwise", 1: "rowwise"}.get(dim)


def layer_shards(module: nn.Module, names: list[str], config) -> dict[str, Shard]:
    """{name: Shard} for the layers among ``names`` whose weight tensor parallelism made a DTensor; {} for an unsharded
    model. Every split is checked (:func:`check_split`) before anything changes."""
    from torch.distributed.tensor import Shard as DShard

    sharded = [n for n in names if _is_dtensor(module.get_submodule(n).weight)]
    if not sharded:
        return {}
    w0 = module.get_submodule(sharded[0]).weight
    specs = _plan_specs(module, w0.device_mesh.size())
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
        check_split(name, _style(dim), blocks, mesh.size(), config, w.device.type == "cuda")
        out[name] = Shard(_style(dim), tuple(blocks), mesh.get_group(), mesh.get_local_rank(), mesh.size())
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
        from . import ops

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
    if cfg.dtype == "fp8":
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


# ---------------------------------------------------------------------------------------------- enable_parallelism
def install(module: nn.Module) -> None:
    """Put the rtlynx-aware ``enable_parallelism`` on a sparsified diffusers model (sparsify calls this)."""
    if callable(getattr(type(module), "enable_parallelism", None)):
        module.enable_parallelism = types.MethodType(enable_parallelism, module)


def uninstall(module: nn.Module) -> None:
    if "enable_parallelism" in module.__dict__:
        del module.enable_parallelism


def _tp_config(config):
    try:
        from diffusers import TensorParallelConfig
    except ImportError:  # a diffusers without tensor parallelism
        return None

    return config if isinstance(config, TensorParallelConfig) else getattr(config, "tensor_parallel_config", None)


def enable_parallelism(self, *, config, cp_plan=None):
    """diffusers' ``enable_parallelism`` for a sparsified model. Context parallelism: diffusers' own (the sparse
    layers need nothing). Tensor parallelism: every sparse layer's split is checked first (nothing changes on an
    error), then the model is un-sparsified, sharded by diffusers and sparsified again (see the module docstring)."""
    base = type(self).enable_parallelism
    tp = _tp_config(config)
    if tp is None or getattr(self, "_tp_plan", None) is None or getattr(self, "_parallel_config", None) is not None:
        return base(self, config=config, cp_plan=cp_plan)  # CP, or diffusers' own error
    from .api import _apply, config_of, sparse_layers, unsparsify
    from .sites import model_sites

    size = tp.mesh.size() if tp.mesh is not None else tp.tp_degree
    cfg = config_of(self)
    layers = sparse_layers(self)
    cuda = any(l.weight.is_cuda for l in layers.values())
    for name, spec in _plan_specs(self, size).items():
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in layers:
            check_split(layer, _style(spec[0]), spec[1], size, cfg, cuda)
    state = {n: (l.lora_rank if l.lora_A is not None else 0, l._override.copy(),
                 None if l.lora_A is None else (l.lora_A.detach().clone(), l.lora_B.detach().clone()))
             for n, l in layers.items()}
    unsparsify(self)

    def restore():
        _apply(self, list(state), cfg, lora_rank=0)
        import torch.distributed as dist

        for name, layer in sparse_layers(self).items():
            rank, override, lora = state[name]
            layer._override.update(override)
            if not rank:
                continue
            a, b = lora
            sh = layer._tp
            if sh is not None:  # rank 0's LoRA, as diffusers makes rank 0's weights the sharded ones
                src = dist.get_global_rank(sh.group, 0)
                dist.broadcast(a, src, group=sh.group)
                dist.broadcast(b, src, group=sh.group)
                a = sh.local(a, 1) if sh.style == "rowwise" else a
                b = sh.local(b, 0) if sh.style == "colwise" else b
            layer.add_lora(rank, rebuild=False)
            with torch.no_grad():
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
        for site in model_sites(self):
            site.refresh_overrides()
            site.build()

    try:
        base(self, config=config, cp_plan=cp_plan)
    except BaseException:
        if not is_sharded(self):
            restore()  # diffusers refused before sharding anything: the model as it was
        raise
    restore()


def allow_cpu_parallelism() -> None:
    """For tests and CPU smoke runs only (rtlynx never calls it): diffusers gates ``enable_parallelism`` to
    accelerators (the device is ``rank % accelerator count``; tensor parallelism names its device types), while its
    CP / TP code runs on CPU tensors with gloo. Lifts those two gates in this process."""
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    try:
        import diffusers.hooks.tensor_parallel as tp
    except ImportError:  # no tensor parallelism in this diffusers
        return
    if "cpu" not in tp._SUPPORTED_TP_DEVICES:
        tp._SUPPORTED_TP_DEVICES = (*tp._SUPPORTED_TP_DEVICES, "cpu")


__all__ = ["LYNX_K_MULTIPLE", "Shard", "all_reduce", "allow_cpu_parallelism", "check_split", "enable_parallelism",
           "global_norm_scale",
           "install", "is_sharded", "layer_shards", "localize", "refuse_sharded", "row_forward", "site_shard",
           "uninstall"]
