"""Automatic layer selection: which sites to make sparse for the most speed within a quality budget.

For every candidate site (the layers that read one input, rtlynx.sites) of a model:

- speed: the sparse kernel's speed-up over dense at the site's real GEMM shape (M rows per call, K, N summed
  over its members) on this GPU, from a per-device speed table (measured here, cached, or loaded from a file);
- quality cost: the relative output error of its layers on calibration inputs (``rtlynx calibrate`` statistics,
  with the LoRA the statistics give, or a quick measurement of norm-compensated pruning on sampled inputs).

``select_sites`` keeps the sites that gain speed (never one that loses) in order of time saved per unit of
cost until the budget is spent, and ``write_preset_file`` writes them as a preset file that
``sparsify(preset="file.json")`` (and so ``save`` / ``load``) accepts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import api, distill
from .api import dense_mode, sparse_layers
from .benchtools import measure
from .config import SparsityConfig
from .sites.operand import fill_rank
from .distill import CalibStats, StatsFiles, residual_error, solve_lora, stat_groups
from .nn import SparseActLinear
from .presets import (PRESET_FORMAT, PRESETS, preset_file_config, read_json, read_preset_file,  # noqa: F401
                      resolve_preset, write_preset_file)

# ------------------------------------------------------------------------------------------ speed tables
SPEED_KEYS = ("dense_ms", "lynx_linear_ms")  # the columns of benchmarks/linear.py's rows (and of measured tables)
SHAPE_TOLERANCE = 1.25  # a table row stands for a shape whose M, K and N are each within this factor


def cache_dir() -> Path:
    import os

    return Path(os.environ.get("RTLYNX_CACHE", Path.home() / ".cache" / "rtlynx"))


def device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def cached_table_path(device: str) -> Path:
    return cache_dir() / f"speed-{''.join(c if c.isalnum() else '_' for c in device)}.json"


def load_speed_table(path) -> dict:
    """A speed table: {"device": ..., "rows": [{"M", "K", "N", "dense_ms", "lynx_linear_ms"}, ...]} (the output
    of ``measure_speed_table`` or of benchmarks/linear.py)."""
    path = Path(path)
    d = read_json(path, "speed table")
    rows = d.get("rows") if isinstance(d, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"M", "K", "N", *SPEED_KEYS} <= set(r)
                                             for r in rows):
        raise ValueError(f"{path} is not a speed table (rows with M, K, N, {', '.join(SPEED_KEYS)})")
    return d


def lookup(table: dict, m: int, k: int, n: int) -> dict | None:
    """The row of ``table`` nearest to shape (m, k, n) in log space, None if no row lies within
    SHAPE_TOLERANCE in every dimension (the speed there is unknown)."""
    import math

    best, best_d = None, None
    for r in table["rows"]:
        ratios = [abs(math.log(max(a, 1) / max(b, 1))) for a, b in ((m, r["M"]), (k, r["K"]), (n, r["N"]))]
        if max(ratios) > math.log(SHAPE_TOLERANCE):
            continue
        d = sum(ratios)
        if best_d is None or d < best_d:
            best, best_d = r, d
    return best


def measure_speed_table(shapes, dtype=None, reps: int = 20, warmup: int = 5, progress: bool = True) -> dict:
    """Time the dense nn.Linear against a SparseActLinear (prune + compress + sparse GEMM, norm, bias; speed rules
    off) at every (M, K, N) of ``shapes`` on this GPU: median of ``reps`` CUDA-event timings after ``warmup``."""
    import torch
    import torch.nn as nn
    from tqdm.auto import tqdm

    if not torch.cuda.is_available():
        raise RuntimeError("measuring a speed table needs a CUDA GPU")
    dtype = dtype or torch.bfloat16

    def median_ms(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]

    rows = []
    for m, k, n in tqdm(sorted(set(shapes)), desc="speed table", disable=not progress):
        lin = nn.Linear(k, n, device="cuda", dtype=dtype)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        with torch.no_grad():
            dense = median_ms(lambda: lin(x))
            sparse_layer = SparseActLinear(nn.Linear(k, n, device="cuda", dtype=dtype), speed_rules=False)
            sparse = median_ms(lambda: sparse_layer(x))
        rows.append({"M": m, "K": k, "N": n, "dense_ms": dense, "lynx_linear_ms": sparse,
                     "backend": type(sparse_layer).__name__})
        del lin, x, sparse_layer
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "dtype": str(dtype), "rows": rows}


def speed_table_for(shapes, table_file=None, measure: bool = True) -> dict:
    """The speed table to use: ``table_file`` if given; on a GPU the cached table of this device, with the
    missing ``shapes`` measured and added to the cache; on the CPU an error (no speed to measure)."""
    if table_file:
        return load_speed_table(table_file)
    dev = device_name()
    if dev is None:
        raise ValueError("no GPU here, so no speed table: pass --speed-table FILE (one written by `rtlynx select` "
                         "on a GPU, in the cache folder " + str(cache_dir()) + ", or benchmarks/results/"
                         "h100_linear.json)")
    path = cached_table_path(dev)
    table = load_speed_table(path) if path.is_file() else {"device": dev, "rows": []}
    missing = [s for s in shapes if not any((r["M"], r["K"], r["N"]) == tuple(s) for r in table["rows"])]
    if missing and measure:
        new = measure_speed_table(missing)
        table["rows"] += new["rows"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    return table


# ------------------------------------------------------------------------------------------ selection
@dataclasses.dataclass
class Candidate:
    layers: list[str]
    m: int              # rows per call
    k: int
    n: int              # summed over the site's members
    calls: int          # calls per sampling step
    cost: float         # quality cost: sum over the layers of the squared relative output error
    dense_ms: float | None = None
    sparse_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        return None if not self.sparse_ms else self.dense_ms / self.sparse_ms

    @property
    def saved_ms(self) -> float:
        """Time saved per sampling step (negative: slower)."""
        return 0.0 if self.speedup is None else self.calls * (self.dense_ms - self.sparse_ms)


def layer_costs(stats, rank: int | str = 0, ridge: float = 1e-3) -> dict[str, float]:
    """Squared relative output error of every layer in ``stats`` (rtlynx.distill.CalibStats, StatsFiles or a
    path: read one site at a time): norm-compensated pruning alone (rank 0), or with the rank-``rank`` LoRA the
    statistics give; ``rank="fill"``: each layer at ``fill_rank`` of its site's members (the shipped kind of LoRA)."""
    def cost(s, r: int) -> float:
        return residual_error(s, *solve_lora(s, r, ridge)) ** 2 if r else residual_error(s) ** 2

    def site_costs(layers: dict) -> dict[str, float]:  # returns before the next site is read: its stats are freed
        r = fill_rank(len(layers)) if rank == "fill" else rank
        return {name: cost(s, r) for name, s in layers.items()}

    src = stats if isinstance(stats, (CalibStats, StatsFiles)) else StatsFiles(stats)
    out = {}
    for site in src.site_names():
        out.update(site_costs(src.read(site).layers))
    return out


def candidates(transformer, rows_per_call: dict[str, tuple[int, int]], costs: dict[str, float],
               table: dict) -> list[Candidate]:
    """One candidate per activation site of the (sparsified) ``transformer``; ``rows_per_call`` maps a layer to
    (rows per call, calls per step), ``costs`` a layer to its quality cost."""
    out = []
    for g in stat_groups(transformer):
        first = g.layers[0]
        if first not in rows_per_call:
            continue  # never called
        m, calls = rows_per_call[first]
        if any(n not in costs for n in g.layers):
            continue  # no statistics for it (calibrated with a narrower preset): not a candidate
        c = Candidate(list(g.layers), m, g.k, sum(g.ns), calls, sum(costs[n] for n in g.layers))
        row = lookup(table, m, c.k, c.n)
        if row is not None:
            c.dense_ms, c.sparse_ms = row["dense_ms"], row["lynx_linear_ms"]
        out.append(c)
    return out


def select_sites(cands: list[Candidate], budget: float, min_speedup: float = 1.02) -> list[Candidate]:
    """The sites to make sparse: of those at least ``min_speedup`` faster (never one that loses, never one of
    unknown speed), the most time saved per unit of quality cost first, while the summed cost stays within
    ``budget`` (a greedy knapsack). The budget has a relative slack of 1e-9: costs summed in another order than
    the budget was (select_layers sums the default preset's layers in module order) differ in the last bits, and
    must not drop a site from a set that costs exactly the budget."""
    fast = [c for c in cands if c.speedup is not None and c.speedup >= min_speedup]
    fast.sort(key=lambda c: c.saved_ms / max(c.cost, 1e-12), reverse=True)
    chosen, spent = [], 0.0
    for c in fast:
        if spent + c.cost <= budget * (1 + 1e-9):
            chosen.append(c)
            spent += c.cost
    return chosen


def confirm_end_to_end(chosen: list[Candidate], time_with, tolerance: float = 0.0) -> tuple[list[Candidate], list]:
    """Keep only what is faster end to end. The speed table times each site's shape alone; in the model a site
    also pays its host time and launches, so a set of sites that each win a little can lose together (SD3.5 on
    an H200: every chosen site >= 1.02x alone, the forward 0.95x dense). ``time_with(layers)`` times one forward
    with ``layers`` sparse (``[]`` = dense). While the sparse forward is slower than ``(1 + tolerance)`` x the
    dense one, the chosen sites of the smallest table speed-up are dropped (all sites of that shape at once) and
    it is timed again; with nothing left the model stays dense. Returns ``(kept, log)``, log rows
    ``{"sites", "layers", "ms", "dense_ms"}``."""
    kept = sorted(chosen, key=lambda c: c.speedup or 0.0, reverse=True)
    dense_ms = time_with([])
    log = []
    while kept:
        ms = time_with([n for c in kept for n in c.layers])
        log.append({"sites": len(kept), "layers": sum(len(c.layers) for c in kept), "ms": ms, "dense_ms": dense_ms})
        if ms * (1.0 - tolerance) <= dense_ms:
            break
        slowest = kept[-1].speedup
        kept = [c for c in kept if c.speedup != slowest]
    return kept, log


def calls_per_step(transformer, run_fn) -> dict[str, tuple[int, int]]:
    """(rows per call, calls per transformer forward) of every sparse layer over ``run_fn()`` (dense)."""
    seen: dict[str, list[int]] = {}
    forwards = [0]
    hooks = [layer.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, []).append(
        inp[0].numel() // inp[0].shape[-1])) for name, layer in sparse_layers(transformer).items()]
    hooks.append(transformer.register_forward_pre_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1)))
    try:
        with dense_mode(transformer):
            import torch

            with torch.no_grad():
                run_fn()
    finally:
        for h in hooks:
            h.remove()
    f = max(forwards[0], 1)
    return {name: (max(rows), max(1, round(len(rows) / f))) for name, rows in seen.items()}


def all_preset(model_class: str) -> str:
    """The widest hand-written preset of a model class (its candidates): "<auto preset>-all" where it exists."""
    base = resolve_preset("auto", model_class)
    return f"{base}-all" if f"{base}-all" in PRESETS else base


def select_layers(runner, budget: float = 1.0, calib=None, rank: int | str = "fill", speed_table=None,
                  min_speedup: float = 1.02, candidate_preset: str | None = None, prompts=("a photo",),
                  steps: int | None = None, height: int | None = None, width: int | None = None,
                  seed: int = 0, confirm: bool = True, confirm_reps: int = 5, centre: str | None = None) -> dict:
    """Choose the sparse sites of ``runner`` (rtlynx.pipelines.Runner; its transformer must be dense).

    ``budget`` is relative to the model's hand-written default preset: the selected sites may cost at most
    ``budget`` times that preset's summed quality cost (1.0: no more output error than the default preset).
    Quality costs come from ``calib`` statistics (with the closed-form LoRA of ``rank``: an int, 0 for none, or
    "fill", see layer_costs) or, without, from a short dense sampling of ``prompts`` (norm compensation only). ``centre`` (SparsityConfig.centre) is the setting the sites will
    run with, for that measurement and the timing (``calib`` statistics carry their own). On a GPU (``confirm``) the
    chosen set is then timed in the model against dense and trimmed until it is not slower
    (:func:`confirm_end_to_end`). Returns a dict with "selected" and "candidates" (Candidate lists), "reference" (the
    default preset's layers), "budget" (absolute) and "table"."""
    transformer = runner.transformer
    reference = api.eligible_layers(transformer, SparsityConfig(preset="auto"))
    candidate_preset = candidate_preset or all_preset(type(transformer).__name__)
    api.sparsify(transformer, preset=candidate_preset, centre=centre)
    try:
        def one_step():
            runner.sample(list(prompts[:1]), steps=1, height=height, width=width, seed=seed, latent=True)

        rows = calls_per_step(transformer, one_step)
        shapes = [(rows[g.layers[0]][0], g.k, sum(g.ns)) for g in distill.stat_groups(transformer)
                  if g.layers[0] in rows]
        table = speed_table_for(shapes, speed_table)
        if calib is not None:
            stats = calib  # read one site at a time by layer_costs
        else:
            stats = distill.collect(transformer, lambda: runner.sample(
                list(prompts), steps=steps or 4, height=height, width=width, seed=seed, latent=True))
        costs = layer_costs(stats, rank if calib is not None else 0)  # a LoRA fitted on the quick sample would flatter
        cands = candidates(transformer, rows, costs, table)
    finally:
        api.unsparsify(transformer)
    ref = set(reference)
    ref_cost = sum(costs.get(n, 0.0) for n in reference)
    if ref_cost == 0:
        raise ValueError("no quality cost for the default preset's layers: calibrate with the candidate preset "
                         f"{candidate_preset!r} (or without --calib)")
    chosen = select_sites(cands, budget * ref_cost, min_speedup)
    confirm_log = None
    if confirm and chosen and next(transformer.parameters()).is_cuda:
        chosen, confirm_log = confirm_end_to_end(chosen, _forward_timer(runner, one_step, reps=confirm_reps,
                                                                        centre=centre))
    ref_saved = sum(c.saved_ms * sum(n in ref for n in c.layers) / len(c.layers) for c in cands)
    return {"selected": chosen, "candidates": cands, "reference": reference, "reference_cost": ref_cost,
            "reference_saved_ms": ref_saved, "budget": budget * ref_cost, "table_device": table.get("device"),
            "candidate_preset": candidate_preset, "end_to_end": confirm_log}


def _forward_timer(runner, one_step, reps: int = 5, centre: str | None = None):
    """``time_with(layers)`` for :func:`confirm_end_to_end`: median ms of one transformer forward on the inputs the
    pipeline gives it (captured from one sampling step), with ``layers`` sparse (sparsified for the call)."""
    transformer = runner.transformer
    captured = {}

    def grab(mod, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    h = transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        one_step()
    finally:
        h.remove()
    args, kwargs = captured["call"]

    def forward_ms():
        import torch

        with torch.no_grad():
            return measure(lambda: transformer(*args, **kwargs), reps=reps, warmup=2, flush_l2=False,
                           sync_each=True).median_ms

    return timer_with_layers(transformer, forward_ms, centre=centre)


def timer_with_layers(transformer, time_fn, centre: str | None = None):
    """``time_with(layers)`` for :func:`confirm_end_to_end`: ``time_fn()`` with exactly ``layers`` of the dense
    ``transformer`` sparsified for the call (``[]``: dense)."""
    def time_with(layers):
        if layers:
            api.sparsify(transformer, preset=None, include=list(layers), centre=centre)
        try:
            return time_fn()
        finally:
            if layers:
                api.unsparsify(transformer)

    return time_with


def report(sel: dict) -> str:
    lines = [f"{'site (first layer)':52s} {'M':>6s} {'K':>6s} {'N':>6s} {'speed-up':>8s} {'saved ms':>8s} "
             f"{'cost':>8s}  pick"]
    chosen = {id(c) for c in sel["selected"]}
    for c in sel["candidates"]:
        sp = "unknown" if c.speedup is None else f"{c.speedup:.2f}x"
        lines.append(f"{c.layers[0][:52]:52s} {c.m:6d} {c.k:6d} {c.n:6d} {sp:>8s} {c.saved_ms:8.3f} {c.cost:8.4f}  "
                     f"{'yes' if id(c) in chosen else ''}")
    for row in sel.get("end_to_end") or []:
        lines.append(f"end to end: {row['sites']} sites ({row['layers']} layers) {row['ms']:.2f} ms, dense "
                     f"{row['dense_ms']:.2f} ms ({row['dense_ms'] / row['ms']:.3f}x)")
    cost = sum(c.cost for c in sel["selected"])
    saved = sum(c.saved_ms for c in sel["selected"])
    lines.append(f"selected {len(sel['selected'])} of {len(sel['candidates'])} sites "
                 f"({sum(len(c.layers) for c in sel['selected'])} layers): predicted {saved:.3f} ms saved per "
                 f"forward, cost {cost:.4f} (budget {sel['budget']:.4f}); the default preset "
                 f"({len(sel['reference'])} layers): {sel['reference_saved_ms']:.3f} ms, cost "
                 f"{sel['reference_cost']:.4f} (speed table: {sel['table_device']})")
    return "\n".join(lines)
