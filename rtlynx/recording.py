"""Recorded transformer calls: the training states of global distillation (rtlynx.distill_global).

A forward pre-hook keeps every call of the transformer while a sampler runs (all its arguments, so any diffusers
pipeline works), the teacher's output at each is added by running the same call dense, and the rows of recorded calls
are sliced and concatenated into training batches: a tensor whose first dimension is the call's batch is per-row, the
rest, and the arguments named in BATCH_SHARED_ARGS (position ids), is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from . import schedule
from .api import dense_mode
from .integrations.diffusers import BATCH_SHARED_ARGS, output_tensor
from .presets import FLOW_STATE_ARGS


@dataclass
class Call:
    """One transformer call: its arguments (tensors detached, on the store device), batch size, noise level,
    and the teacher's output once known."""

    args: tuple
    kwargs: dict
    rows: int
    t: float | None
    target: torch.Tensor | None = None


def _batch_size(args, kwargs) -> int | None:
    for v in (*args, *kwargs.values()):
        if torch.is_tensor(v) and v.dim() >= 2:
            return v.shape[0]
    return None


class Recorder:
    """Records every call of ``module`` inside the block (a forward pre-hook); tensors go to ``device``.
    ``outputs=True`` also keeps each call's main output as its target (a forward hook): for a rollout that runs the
    teacher itself, so its calls need not be run again."""

    def __init__(self, module: torch.nn.Module, device=None, outputs: bool = False):
        self.module, self.device, self.outputs, self.calls, self._h = module, device, outputs, [], []
        self._open: Call | None = None

    def store(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.device is None else x.detach().to(self.device)

    def _hook(self, mod, args, kwargs):
        self._open = None
        rows = _batch_size(args, kwargs)
        if rows is None:
            return
        keep = tree_map_only(torch.Tensor, self.store, (args, kwargs))
        self._open = Call(keep[0], keep[1], rows, schedule.noise_level(mod, args, kwargs))
        self.calls.append(self._open)

    def _out_hook(self, mod, args, kwargs, out):
        if self._open is not None:
            self._open.target = self.store(output_tensor(out))
            self._open = None

    def __enter__(self):
        self._h = [self.module.register_forward_pre_hook(self._hook, with_kwargs=True)]
        if self.outputs:
            self._h.append(self.module.register_forward_hook(self._out_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._h:
            h.remove()


def to_device(obj, device):
    return tree_map_only(torch.Tensor, lambda x: x.to(device, non_blocking=True), obj)


def run(transformer, args, kwargs) -> torch.Tensor:
    """The transformer's main output for recorded arguments (moved to its device)."""
    dev = next(transformer.parameters()).device
    return output_tensor(transformer(*to_device(args, dev), **to_device(kwargs, dev)))


def _split_shared(kwargs: dict) -> tuple[dict, dict]:
    return ({k: v for k, v in kwargs.items() if k not in BATCH_SHARED_ARGS},
            {k: v for k, v in kwargs.items() if k in BATCH_SHARED_ARGS})


def rows_of(call: Call, idx: torch.Tensor) -> tuple[tuple, dict, torch.Tensor, torch.Tensor]:
    """(args, kwargs, target, per-row t) of the rows ``idx`` of a call; t is -1 where the call had none."""
    def pick(x):
        return x[idx.to(x.device)] if x.dim() >= 1 and x.shape[0] == call.rows else x

    batched, shared = _split_shared(call.kwargs)
    args, kwargs = tree_map_only(torch.Tensor, pick, (call.args, batched))
    t = torch.full((len(idx),), -1.0 if call.t is None else call.t)
    return args, {**kwargs, **shared}, call.target[idx.to(call.target.device)], t


def cat_rows(parts):
    """Concatenate row selections (:func:`rows_of`) of several calls along the batch; shared tensors from the first."""
    if len(parts) == 1:
        return parts[0]
    sizes = [p[2].shape[0] for p in parts]
    flat = [tree_flatten((p[0], _split_shared(p[1])[0])) for p in parts]
    merged = []
    for col in zip(*(leaves for leaves, _ in flat)):
        per_row = all(torch.is_tensor(x) and x.dim() >= 1 and x.shape[0] == s for x, s in zip(col, sizes))
        merged.append(torch.cat(col) if per_row else col[0])
    args, kwargs = tree_unflatten(merged, flat[0][1])
    return (args, {**kwargs, **_split_shared(parts[0][1])[1]}, torch.cat([p[2] for p in parts]),
            torch.cat([p[3] for p in parts]))


def row_error(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row squared error and target energy."""
    dims = tuple(range(1, out.dim()))
    return (out.float() - target.float()).pow(2).sum(dims), target.float().pow(2).sum(dims)


def record_round(transformer, rollout: Callable[[list[str], int], object], prompts: list[str], seed: int,
                 states: str, store_device=None) -> list[Call]:
    """Run ``rollout(prompts, seed)`` (a sampler) with the student (``states="student"``) or the dense model,
    record its transformer calls, then the teacher's output at each (a dense rollout's own outputs: its calls are
    the teacher's already, so the sampler must not approximate them, e.g. by caching blocks across steps)."""
    with torch.no_grad():
        rec = Recorder(transformer, store_device, outputs=states == "dense")
        if states == "dense":
            with dense_mode(transformer), rec:
                rollout(prompts, seed)
        else:
            with rec:
                rollout(prompts, seed)
        with dense_mode(transformer):
            for c in rec.calls:
                if c.target is None:
                    c.target = rec.store(run(transformer, c.args, c.kwargs))
    return rec.calls


def flow_state_arg(transformer) -> str:
    """The argument holding a flow-matching sampler's state x_t for this model; ValueError where it is not known."""
    arg = FLOW_STATE_ARGS.get(type(transformer).__name__)
    if arg is None:
        raise ValueError(f"the endpoint target needs a flow-matching model whose state argument is known; "
                         f"{type(transformer).__name__} is not one of {sorted(FLOW_STATE_ARGS)}")
    return arg


@torch.no_grad()
def endpoint_targets(transformer, student: list[Call], dense: list[Call], weight: float = 1.0,
                     t_floor: float = 0.1) -> None:
    """Turn the teacher targets of a student rollout into endpoint targets, in place.

    ``dense`` is the dense sampler's rollout from the same prompts and noise (call i of each is the same step). A
    flow-matching sampler at state x with noise level t lands on x - t v; the dense sampler at its own state x_d lands
    on x_d - t v_d. The velocity that takes the student's state x_s there is v* = v_d + (x_s - x_d) / t, so the target
    becomes ``v_T(x_s) + weight * (v* - v_T(x_s))``: the teacher's velocity where the student is (weight 0) pulled
    toward the dense sample of the same noise (weight 1). t is floored at ``t_floor``: on the last steps the distance
    left cannot be made up, and (x_s - x_d) / t would explode."""
    arg = flow_state_arg(transformer)
    if len(student) != len(dense):
        raise ValueError(f"the student and dense rollouts made {len(student)} and {len(dense)} transformer calls: "
                         "not the same sampler")
    for i, (s, d) in enumerate(zip(student, dense)):
        xs, xd = s.kwargs.get(arg), d.kwargs.get(arg)
        if xs is None or xd is None or xs.shape != xd.shape or s.t is None or s.t != d.t:
            raise ValueError(f"call {i} of the two rollouts differs (state {arg!r} or noise level): "
                             "not the same sampler, prompts or noise")
        t = max(s.t, t_floor)
        pull = d.target.float() + (xs.float() - xd.float()).to(d.target.device) / t
        s.target = (s.target.float() + weight * (pull - s.target.float())).to(s.target.dtype)


@torch.no_grad()
def velocity_error(transformer, calls: list[Call], max_rows: int = 256) -> float:
    """Relative error of the model's outputs against the recorded teacher's: sum |v_s - v_t|^2 / sum |v_t|^2."""
    num = den = 0.0
    for c in calls:
        for i in range(0, c.rows, max_rows):
            args, kwargs, target, _ = rows_of(c, torch.arange(i, min(c.rows, i + max_rows)))
            out = run(transformer, args, kwargs)
            d, e = row_error(out, target.to(out.device))
            num += float(d.sum())
            den += float(e.sum())
    return num / den if den else float("nan")


__all__ = ["Call", "Recorder", "cat_rows", "endpoint_targets", "flow_state_arg", "record_round", "row_error",
           "rows_of", "run", "to_device", "velocity_error"]
