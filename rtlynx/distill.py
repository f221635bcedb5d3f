"""LoRA distillation of the compensation branch, layer by layer, in closed form.

The paper distils each layer's LoRA so that ``s * (x~ W^T) + b + (x A^T) B^T`` matches the dense
``x W^T + b`` in mean squared error, with the base frozen, on activations the dense model produces.
With W frozen the target residual ``R = x W^T - s * x~ W^T`` is fixed for each input, and the LoRA term
is linear in x with rank r: minimising ``|R - x A^T B^T|^2`` is reduced-rank regression, whose
global optimum has a closed form. So instead of ~2k SGD steps over stored activations we stream each
layer's sufficient statistics (``G = sum x^T x``, ``C = sum x^T R``, ``|R|^2``, ``|Y|^2``) during dense
sampling and solve:

    M = (G + lambda I)^-1 C            least-squares full-rank correction [K, N]
    V_r = top-r eigenvectors of M^T G M  (directions of the fitted residual with most energy)
    A = (M V_r)^T  [r, K],  B = V_r  [N, r]

This is the exact minimiser of the same loss (up to the small ridge), needs no learning rate or
epochs, and the statistics can be accumulated over more prompts at any time (resume = add batches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import reference
from .api import sparse_layers
from .nn import SparseActLinear

STATS_FORMAT = 1


@dataclass
class LayerStats:
    k: int
    n: int
    xtx: torch.Tensor  # [K, K] float64
    xtr: torch.Tensor  # [K, N] float64
    rr: float = 0.0    # sum |R|^2
    yy: float = 0.0    # sum |x W^T|^2
    rows: int = 0

    @classmethod
    def empty(cls, k: int, n: int, device="cpu") -> "LayerStats":
        return cls(k, n, torch.zeros(k, k, dtype=torch.float64, device=device),
                   torch.zeros(k, n, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor, layer: SparseActLinear) -> None:
        """Accumulate rows ``x [T, K]`` seen by ``layer`` (its pattern and compensation define R)."""
        x = x.detach().float()
        if layer.in_features % layer.m:
            raise ValueError("distillation needs K to be a multiple of m")
        w = layer.weight.detach().float()
        y = F.linear(x, w)
        r = y - reference.sparse_act_linear(x, w, None, layer.n, layer.m, layer.compensation, eps=layer.eps)
        self.xtx += (x.T @ x).double()
        self.xtr += (x.T @ r).double()
        self.rr += float(r.double().pow(2).sum())
        self.yy += float(y.double().pow(2).sum())
        self.rows += x.shape[0]

    def merge(self, other: "LayerStats") -> None:
        self.xtx += other.xtx.to(self.xtx.device)
        self.xtr += other.xtr.to(self.xtr.device)
        self.rr += other.rr
        self.yy += other.yy
        self.rows += other.rows


@dataclass
class CalibStats:
    layers: dict[str, LayerStats] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def save(self, path, overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (or --resume to add to it)")
        tensors, scalars = {}, {}
        for name, s in self.layers.items():
            tensors[f"{name}.xtx"] = s.xtx.cpu().contiguous()
            tensors[f"{name}.xtr"] = s.xtr.cpu().contiguous()
            scalars[name] = {"rr": s.rr, "yy": s.yy, "rows": s.rows}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": str(STATS_FORMAT), "scalars": json.dumps(scalars),
                                               "meta": json.dumps(self.meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path, device="cpu") -> "CalibStats":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration statistics at {path} (run `rtlynx calibrate` first)")
        try:
            with safe_open(str(path), "pt", device=str(device)) as f:
                md = f.metadata() or {}
                if md.get("format") != str(STATS_FORMAT):
                    raise ValueError(f"{path}: not an rtlynx calibration file (format {md.get('format')!r})")
                scalars = json.loads(md["scalars"])
                layers = {}
                for name, sc in scalars.items():
                    xtx, xtr = f.get_tensor(f"{name}.xtx"), f.get_tensor(f"{name}.xtr")
                    layers[name] = LayerStats(xtx.shape[0], xtr.shape[1], xtx, xtr, sc["rr"], sc["yy"], sc["rows"])
                return cls(layers, json.loads(md.get("meta", "{}")))
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is corrupt: {e}") from e


def collect(transformer, run_fn, stats: CalibStats | None = None) -> CalibStats:
    """Run ``run_fn()`` (e.g. dense sampling) with the sparsified ``transformer`` in dense mode and
    accumulate every sparse layer's statistics from the inputs it sees."""
    from .api import dense_mode

    layers = sparse_layers(transformer)
    if not layers:
        raise ValueError("transformer has no SparseActLinear layers: sparsify it first")
    stats = stats or CalibStats()
    for name, layer in layers.items():
        if name not in stats.layers:
            stats.layers[name] = LayerStats.empty(layer.in_features, layer.out_features, layer.weight.device)
        elif (stats.layers[name].k, stats.layers[name].n) != (layer.in_features, layer.out_features):
            raise ValueError(f"statistics for {name} have another shape than the model's layer")

    def hook(name):
        def fn(mod, inp, out):
            stats.layers[name].add(inp[0].reshape(-1, mod.in_features), mod)
        return fn

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad(), dense_mode(transformer):
            run_fn()
    finally:
        for h in handles:
            h.remove()
    return stats


def solve_lora(s: LayerStats, rank: int, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form rank-``rank`` LoRA (A [r, K], B [N, r]) minimising the layer's residual MSE."""
    if s.rows == 0:
        raise ValueError("no calibration rows for this layer")
    rank = min(rank, s.k, s.n)
    g = s.xtx / s.rows
    c = s.xtr / s.rows
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(s.k, dtype=g.dtype, device=g.device)
    m = torch.linalg.solve(g + lam * eye, c)  # [K, N]
    fitted = m.T @ g @ m  # [N, N], energy of x M per output direction
    evals, evecs = torch.linalg.eigh((fitted + fitted.T) / 2)
    v = evecs[:, -rank:].flip(-1)  # top-r, largest first
    return (m @ v).T.contiguous(), v.contiguous()


def residual_error(s: LayerStats, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> float:
    """Relative output error |Y - Y~| / |Y| of the layer on these statistics, with LoRA (a, b) or without."""
    err = s.rr
    if a is not None:
        m = (b @ a).T.to(s.xtx)  # [K, N]
        err = s.rr - 2 * float((m * s.xtr).sum()) + float((m * (s.xtx @ m)).sum())
    return (max(err, 0.0) / max(s.yy, 1e-30)) ** 0.5


def fit_lora(transformer, stats: CalibStats, rank: int, ridge: float = 1e-3, val: CalibStats | None = None,
             progress: bool = True) -> list[dict]:
    """Give every sparse layer of ``transformer`` a rank-``rank`` LoRA solved from ``stats``.
    Returns per-layer rows: error without / with LoRA (on ``val`` too when given)."""
    from tqdm.auto import tqdm

    layers = sparse_layers(transformer)
    missing = [n for n in layers if n not in stats.layers]
    if missing:
        raise ValueError(f"no calibration statistics for {len(missing)} layers, e.g. {missing[0]}")
    report = []
    for name, layer in tqdm(layers.items(), desc="lora", disable=not progress):
        s = stats.layers[name]
        a, b = solve_lora(s, rank, ridge)
        layer.add_lora(a.shape[0])
        with torch.no_grad():
            layer.lora_A.copy_(a.to(layer.lora_A))
            layer.lora_B.copy_(b.to(layer.lora_B))
        row = {"layer": name, "rank": a.shape[0], "err_norm": residual_error(s), "err_lora": residual_error(s, a, b)}
        if val is not None and name in val.layers:
            row["val_err_norm"] = residual_error(val.layers[name])
            row["val_err_lora"] = residual_error(val.layers[name], a, b)
        report.append(row)
    return report
