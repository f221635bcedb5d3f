"""Activation sites: the unit rtlynx runs on.

A *site* is one producer (the input as given, or GELU-tanh of an MLP pre-activation) whose output x is pruned and
compressed **once**, and the sparse layers that read x (Q, K, V; FLUX's single-block Q, K, V and MLP up):

    y_cat = s * (prune(x) @ [W_1; ...; W_k]^T) + [b_1; ...; b_k] + (x [A_1; ...; A_k]^T) blockdiag(B_1, ..., B_k)^T

computed as one prune pass and one sparse GEMM per member on its rows of the concatenated operand, so that every
member's output is a contiguous tensor of its own (column views of one [M, N_cat] result cost more downstream
than the extra launches: benchmarks/NOTES.md, v8).

Memory (:mod:`rtlynx.sites.operand`): the site owns one GEMM operand ``wext [N_1 + ... + N_k, Kp + 2 rp] =
[W_cat | 0 | B-expanded]`` (``rtlynx.reference.sm90.expand_lora_b``; rp = round_up(total LoRA rank, 64)) plus a bias
and a LoRA-A buffer; the layers' ``weight``, ``bias``, ``lora_A`` and ``lora_B`` parameters are re-pointed at views
of them. No second copy of a weight exists, and ``state_dict`` / ``load_state_dict`` / optimisers still see the
original parameter objects under their original names. The dtype's kernel family (:mod:`rtlynx.families`) decides
the storage format (bf16, FP8) and runs the site's GEMMs.

Dispatch: the layers stay the model's own modules, so the model's forward code is unchanged. On the lynx kernels
the first layer of a site called with a tensor x computes every member's output and hands the others theirs when
they are called with the same tensor object x. A site whose members are called
with different inputs (the shared result goes unused) is split, with a warning, into one GEMM per member on row
slices of the same operand. Every other backend (reference, cuSPARSELt, fallbacks) runs member by member, exactly
as a lone :class:`rtlynx.nn.SparseActLinear`.

Modules: ``core`` (Site, Settings: the path of a call and the shared outputs), ``operand`` (storage), ``adapters``
(the user's PEFT adapters in the LoRA tail, after the compensation LoRA's rows), ``grouping`` (sites from the
presets' rules), ``shard`` (tensor-parallel splits, the row-parallel forward), ``verify``.

Settings: a sparsified model holds exactly one :class:`rtlynx.config.SparsityConfig`, in one :class:`Settings`
object that its layers and sites share by reference (never copied).
"""
from __future__ import annotations

from .core import Settings, Site
from .grouping import build_sites, group_sites, layer_at, model_sites
from .verify import verify

__all__ = ["Settings", "Site", "build_sites", "group_sites", "layer_at", "model_sites", "verify"]
