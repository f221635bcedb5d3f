"""Memory plans printed before long work starts. Calibration's: the activation sites of a sparsified transformer
grouped into passes whose statistics (one Gram per site, one cross-product per layer) fit a budget (``rtlynx
calibrate --max-stats-gb``). Global distillation's (:class:`MemoryPlan`): the model, the LoRA's fp32 master copies and
Adam moments, the recorded calls."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils._pytree import tree_flatten

from .api import sparse_layers
from .sites import model_sites

if TYPE_CHECKING:
    from .recording import Call

GB = 2 ** 30


@dataclass
class Group:
    """Layers that read one input (an activation site): one Gram [K, K] + one [K, N_i] per layer."""

    layers: list[str]
    k: int
    ns: list[int]

    def nbytes(self, itemsize: int = 4) -> int:
        return itemsize * self.k * (self.k + sum(self.ns))


@dataclass
class Plan:
    passes: list[list[Group]]
    budget_bytes: int | None
    itemsize: int = 4

    def pass_bytes(self) -> list[int]:
        return [sum(g.nbytes(self.itemsize) for g in p) for p in self.passes]

    @property
    def total_bytes(self) -> int:
        return sum(self.pass_bytes())

    def report(self) -> str:
        sizes = self.pass_bytes()
        lines = [f"calibration statistics: {self.total_bytes / GB:.2f} GiB in {len(sizes)} pass"
                 f"{'es' if len(sizes) > 1 else ''} (budget "
                 f"{'none' if self.budget_bytes is None else f'{self.budget_bytes / GB:.2f} GiB'})"]
        for i, (p, b) in enumerate(zip(self.passes, sizes)):
            lines.append(f"  pass {i + 1}: {sum(len(g.layers) for g in p)} layers in {len(p)} sites, {b / GB:.2f} GiB")
        return "\n".join(lines)


def stat_groups(transformer) -> list[Group]:
    """The Gram-sharing groups of a sparsified transformer, in module order: its activation sites."""
    names = {id(m): n for n, m in sparse_layers(transformer).items()}
    if not names:
        raise ValueError("transformer has no SparseActLinear layers: sparsify it first")
    groups = [Group([names[id(l)] for l in site.layers], site.k, [l.out_features for l in site.layers])
              for site in model_sites(transformer)]
    covered = {n for g in groups for n in g.layers}
    groups += [Group([n], l.in_features, [l.out_features]) for n, l in sparse_layers(transformer).items()
               if n not in covered]
    return groups


def plan(transformer, max_stats_gb: float | None = None, itemsize: int = 4) -> Plan:
    """Split the statistics over passes of at most ``max_stats_gb`` (None: one pass), site by site in module
    order. A site larger than the budget gets a pass of its own (with a warning)."""
    budget = None if max_stats_gb is None else int(max_stats_gb * GB)
    passes: list[list[Group]] = [[]]
    used = 0
    for g in stat_groups(transformer):
        b = g.nbytes(itemsize)
        if budget is not None and b > budget:
            warnings.warn(f"site {g.layers[0]}... needs {b / GB:.2f} GiB of statistics, more than the budget "
                          f"{max_stats_gb} GB: it gets a pass of its own", RuntimeWarning, stacklevel=2)
        if budget is not None and passes[-1] and used + b > budget:
            passes.append([])
            used = 0
        passes[-1].append(g)
        used += b
    return Plan(passes, budget, itemsize)


@dataclass
class MemoryPlan:
    lora_params: int
    model_bytes: int
    optimizer_bytes: int
    call_bytes: int
    calls_per_round: int | None
    store: str
    checkpointing: bool = True

    def report(self) -> str:
        gib = 2 ** 30
        calls = (f"{self.call_bytes / 2 ** 20:.1f} MiB per recorded call (args + teacher output)"
                 + (f", ~{self.calls_per_round} calls per rollout" if self.calls_per_round else ""))
        return (f"global distillation memory plan: model {self.model_bytes / gib:.2f} GiB; "
                f"{self.lora_params:,} LoRA parameters, fp32 master + Adam {self.optimizer_bytes / 2 ** 20:.1f} MiB; "
                f"{calls}, stored on {self.store}; activations: "
                + ("one block at a time (gradient checkpointing)" if self.checkpointing else "whole forward (no checkpointing)")
                + " (measured peak printed after the first step)")


def memory_plan(transformer, params, sample_call: Call | None = None, calls_per_round: int | None = None,
                store: str = "model device", checkpointing: bool = True) -> MemoryPlan:
    model_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    n = sum(p.numel() for p in params.values())
    call_bytes = 0
    if sample_call is not None:
        leaves = tree_flatten((sample_call.args, sample_call.kwargs, sample_call.target))[0]
        call_bytes = sum(x.numel() * x.element_size() for x in leaves if torch.is_tensor(x))
    return MemoryPlan(n, model_bytes, 16 * n, call_bytes, calls_per_round, store, checkpointing)
