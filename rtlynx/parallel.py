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
``enable_parallelism`` on the model (:func:`rtlynx.api.enable_parallelism`) that, for tensor parallelism, checks
every sparse layer's split, un-sparsifies,
lets diffusers shard the plain model (rank 0's weights are broadcast) and sparsifies the sharded model again with the
same config, LoRA weights (rank 0's, sliced) and per-layer overrides. ``sparsify`` also takes a model that is already
sharded (``from_pretrained(..., parallel_config=...)``). ``rtlynx.save`` / ``load`` / ``unsparsify`` need the
unsharded model (they raise on a tensor-parallel one).

Where the code is: the shards and the row-parallel forward in :mod:`rtlynx.sites.shard`, the re-sparsifying
``enable_parallelism`` in :mod:`rtlynx.api` (it unsparsifies and sparsifies), its installation in
:mod:`rtlynx.integrations.diffusers`; this module gathers their public names.
"""

from __future__ import annotations

import torch

from .api import enable_parallelism
from .sites.shard import (LYNX_K_MULTIPLE, Shard, all_reduce, check_split, global_norm_scale, is_sharded,
                          layer_shards, localize, refuse_sharded, row_forward, site_shard)


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
           "global_norm_scale", "is_sharded", "layer_shards", "localize", "refuse_sharded", "row_forward",
           "site_shard"]
