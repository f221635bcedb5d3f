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
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import reference, validate
from .api import dense_mode, sparse_layers
from .nn import SparseActLinear
from .calib_plan import GB, Group, Plan, plan, stat_groups  # noqa: F401  (rtlynx.distill.plan & co.)

STATS_FORMAT = 2  # 2: one Gram per activation site (format 1, one per layer, still loads)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: half-precision operands on a GPU stay half (tensor cores, exact products,
    fp32 accumulation); everything else runs in fp32."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
            pass
    return a.float() @ b.float()


@dataclass
class LayerStats:
    """Sufficient statistics of one layer. ``xtx`` is the Gram of its input; the layers of one activation site
    read the same input and share one Gram tensor (the same object). Sums are kept in fp32 (the rounding of a
    sum of N fp32 terms, ~sqrt(N) 2^-24 relative, is far below the ridge of the solve), energies in Python
    floats (fp64); :func:`solve_lora` works in fp64."""

    k: int
    n: int
    xtx: torch.Tensor  # [K, K]
    xtr: torch.Tensor  # [K, N]
    rr: float = 0.0    # sum |R|^2
    yy: float = 0.0    # sum |x W^T|^2
    rows: int = 0

    @classmethod
    def empty(cls, k: int, n: int, device="cpu", gram: torch.Tensor | None = None,
              dtype=torch.float32) -> "LayerStats":
        xtx = gram if gram is not None else torch.zeros(k, k, dtype=dtype, device=device)
        return cls(k, n, xtx, torch.zeros(k, n, dtype=dtype, device=device))

    def add(self, x: torch.Tensor, layer: SparseActLinear, gram: bool = True, y: torch.Tensor | None = None,
            centre: torch.Tensor | None = None) -> None:
        """Accumulate rows ``x [T, K]`` seen by ``layer`` (its pattern and compensation define R); ``gram=False``
        when another member of the site already added ``x``'s Gram; ``y`` = x W^T when the caller has it;
        ``centre`` [T, K] (SparsityConfig.centre, each row's centre): the layer prunes ``x - c`` and adds c W^T."""
        x = x.detach()
        w = layer.dense_weight().detach()
        xf = x.float()
        xs = xf if centre is None else reference.centred(x, centre).float()  # rounded as the layer rounds it
        # K not a multiple of m: prune the zero-padded row, as the layer does (k_remainder "pad")
        xp = reference.prune_nm(reference.pad_to_multiple(xs, layer.m), layer.n, layer.m)[:, : x.shape[1]]
        if x.shape[1] % layer.m and layer.k_remainder == "dense":
            xp = xs  # the layer runs dense: no residual
        elif layer.compensation == "norm":
            xp = xp * reference.norm_scale(xs, xp, eps=layer.eps)[:, None]
        # R = x W^T - (s x~ W^T + c W^T) = (x - c - s x~) W^T: one GEMM (x~ the kept part of x - c)
        d = xf - xp if centre is None else xf - centre.float() - xp
        dev = self.xtr.device
        r = _mm32(d.to(w.dtype), w.T)
        if gram:
            self.xtx += _mm32(x.T, x).to(dev)
        self.xtr += _mm32(x.T, r.to(x.dtype)).to(dev)
        self.rr += float(r.double().pow(2).sum())
        if y is None:
            y = _mm32(x, w.T)
        self.yy += float(y.double().pow(2).sum())
        self.rows += x.shape[0]

    def merge(self, other: "LayerStats", gram: bool = True) -> None:
        if gram:
            self.xtx += other.xtx.to(self.xtx)
        self.xtr += other.xtr.to(self.xtr)
        self.rr += other.rr
        self.yy += other.yy
        self.rows += other.rows


def _check_stats_file(path: Path, md: dict) -> None:
    if md.get("format") not in ("1", str(STATS_FORMAT)):
        raise ValueError(f"{path}: not an rtlynx calibration file (format {md.get('format')!r})")


def _check_scalars(path: Path, name: str, sc: dict) -> None:
    """A layer's row count and energies (rtlynx.validate: one-line ValueError naming the file and layer)."""

    validate.integer(f"{path}: {name} rows", sc["rows"], 0)
    for key in ("rr", "yy"):
        validate.real(f"{path}: {name} {key}", sc[key], 0.0)


@dataclass
class CalibStats:
    layers: dict[str, LayerStats] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def save(self, path, overwrite: bool = False) -> Path:
        """One safetensors file; a Gram shared by several layers is written once (under its first layer)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (or --resume to add to it)")
        tensors, scalars, owner = {}, {}, {}
        for name, s in self.layers.items():
            key = owner.setdefault(id(s.xtx), name)
            if key == name:
                tensors[f"{name}.xtx"] = s.xtx.cpu().contiguous()
            tensors[f"{name}.xtr"] = s.xtr.cpu().contiguous()
            scalars[name] = {"rr": s.rr, "yy": s.yy, "rows": s.rows, "gram": key}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": str(STATS_FORMAT), "scalars": json.dumps(scalars),
                                               "meta": json.dumps(self.meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path, device="cpu") -> "CalibStats":
        """A statistics file, or a directory of them (one per calibration pass: disjoint layers, merged), all in
        memory; :class:`StatsFiles` reads them a site at a time instead."""
        return StatsFiles(path).read(device=device)

    def site_names(self) -> list[list[str]]:
        """The layer names grouped by shared Gram (activation site), in order."""
        sites: dict[int, list[str]] = {}
        for name, s in self.layers.items():
            sites.setdefault(id(s.xtx), []).append(name)
        return list(sites.values())

    def read(self, names, device=None) -> "CalibStats":
        """The statistics of ``names`` (the same objects; ``device`` is ignored: they stay where they are)."""
        return CalibStats({n: self.layers[n] for n in names}, self.meta)


def stats_parts(path) -> list[Path]:
    """The statistics files at ``path``: the file itself, or a pass directory's pass-*.safetensors in order."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("pass-*.safetensors"))
        if not parts:
            raise FileNotFoundError(f"{path} holds no calibration passes (pass-*.safetensors)")
        return parts
    if not path.is_file():
        raise FileNotFoundError(f"no calibration statistics at {path} (run `rtlynx calibrate` first)")
    return [path]


class StatsFiles:
    """Calibration statistics on disk (a file or a pass directory), read lazily: the metadata when opened, the
    tensors of the layers asked for by :meth:`read`, so a caller can hold one site at a time. A pass directory's
    ``meta`` holds the settings all passes share and ``"passes"``, the list of each pass's own meta."""

    def __init__(self, path):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self.parts = stats_parts(path)
        self.layers: dict[str, tuple[Path, str, dict]] = {}  # layer -> (file, Gram owner, scalars)
        metas = []
        for part in self.parts:
            try:
                with safe_open(str(part), "pt") as f:  # the header only
                    md = f.metadata() or {}
                    keys = set(f.keys())
                _check_stats_file(part, md)
                scalars = json.loads(md["scalars"])
                metas.append(json.loads(md.get("meta", "{}")))
                for name, sc in scalars.items():
                    gram = sc.get("gram", name)  # format 1: every layer owns its Gram
                    if not {"rr", "yy", "rows"} <= sc.keys():
                        raise KeyError(f"the scalars of {name} are incomplete")
                    _check_scalars(part, name, sc)
                    missing = {f"{gram}.xtx", f"{name}.xtr"} - keys
                    if missing:
                        raise KeyError(f"tensor {sorted(missing)[0]} is missing")
                    if name in self.layers:
                        raise ValueError(f"{part}: layer {name} is also in {self.layers[name][0]}: "
                                         "these passes come from different calibrations")
                    self.layers[name] = (part, gram, sc)
            except SafetensorError as e:
                raise ValueError(f"{part} is not a safetensors file: {e}") from e
            except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
                raise ValueError(f"{part} is corrupt: {e}") from e
        if self.path.is_dir():
            common = {k: v for k, v in metas[0].items() if k not in ("calib_pass", "passes")
                      and all(m.get(k) == v for m in metas)}
            self.meta = common | {"passes": metas}
        else:
            self.meta = metas[0]

    def site_names(self) -> list[list[str]]:
        """The layer names grouped by shared Gram (activation site), in file order."""
        sites: dict[tuple[Path, str], list[str]] = {}
        for name, (part, gram, _) in self.layers.items():
            sites.setdefault((part, gram), []).append(name)
        return list(sites.values())

    def read(self, names=None, device="cpu") -> CalibStats:
        """The statistics of ``names`` (default: all) on ``device``; each Gram is read once and shared."""
        from safetensors import safe_open

        names = list(self.layers) if names is None else list(names)
        layers: dict[str, LayerStats] = {}
        grams: dict[tuple[Path, str], torch.Tensor] = {}
        for part in dict.fromkeys(self.layers[n][0] for n in names):  # one open per file
            with safe_open(str(part), "pt", device=str(device)) as f:
                for name in names:
                    where, gram, sc = self.layers[name]
                    if where != part:
                        continue
                    if (part, gram) not in grams:
                        grams[part, gram] = f.get_tensor(f"{gram}.xtx")
                    xtx, xtr = grams[part, gram], f.get_tensor(f"{name}.xtr")
                    layers[name] = LayerStats(xtx.shape[0], xtr.shape[1], xtx, xtr, sc["rr"], sc["yy"], sc["rows"])
        return CalibStats({n: layers[n] for n in names}, self.meta)


# ------------------------------------------------------------------------------------------ memory plan
def collect(transformer, run_fn, stats: CalibStats | None = None, groups: list[Group] | None = None,
            device=None) -> CalibStats:
    """Run ``run_fn()`` (e.g. dense sampling) with the sparsified ``transformer`` in dense mode and accumulate
    the statistics of the layers in ``groups`` (default: all) on ``device`` (default: each layer's device).
    Members of a site share one Gram; a site whose members turn out to read different inputs is an error."""
    layers = sparse_layers(transformer)
    if not layers:
        raise ValueError("transformer has no SparseActLinear layers: sparsify it first")
    groups = groups if groups is not None else stat_groups(transformer)
    stats = stats or CalibStats()
    state = {}
    for g in groups:
        first = g.layers[0]
        dev = device or layers[first].weight.device
        gram = stats.layers[first].xtx if first in stats.layers else None
        for name in g.layers:
            layer = layers[name]
            if name not in stats.layers:
                stats.layers[name] = LayerStats.empty(layer.in_features, layer.out_features, dev, gram=gram)
                gram = stats.layers[name].xtx
            elif (stats.layers[name].k, stats.layers[name].n) != (layer.in_features, layer.out_features):
                raise ValueError(f"statistics for {name} have another shape than the model's layer")
            state[name] = g
    last_x: dict[int, torch.Tensor] = {}  # per group: the input whose Gram was added last
    centres: dict[int, torch.Tensor] = {}  # per group: that input's row centres (SparsityConfig.centre)
    rows_before = {n: stats.layers[n].rows for n in state}
    gram_rows = {id(g): 0 for g in groups}

    def hook(name):
        g = state[name]

        def fn(mod, inp, out):
            x = inp[0].reshape(-1, mod.in_features)
            new = last_x.get(id(g)) is not inp[0]
            if new:
                last_x[id(g)] = inp[0]
                gram_rows[id(g)] += x.shape[0]
                if mod._settings.config.centre is not None:  # each row's centre, once per input of the group
                    centres[id(g)] = reference.row_centres(inp[0])
            y = out.reshape(-1, mod.out_features).float()
            if mod.bias is not None:
                y = y - mod.bias.float()
            stats.layers[name].add(x, mod, gram=new, y=y, centre=centres.get(id(g)))
        return fn

    handles = [layers[name].register_forward_hook(hook(name)) for name in state]
    try:
        with torch.no_grad(), dense_mode(transformer):
            run_fn()
    finally:
        for h in handles:
            h.remove()
        last_x.clear()
        centres.clear()
    for g in groups:
        seen = {stats.layers[n].rows - rows_before[n] for n in g.layers}
        if len(g.layers) > 1 and seen != {gram_rows[id(g)]}:
            raise ValueError(f"the layers {g.layers} of one site read different inputs; calibrate with "
                             "fuse_sites=False so each gets a Gram of its own")
    return stats


def _check_fit_args(rank, ridge) -> None:

    validate.integer("LoRA rank", rank, 1)  # evecs[:, -0:] would select every column: a full-rank "LoRA"
    validate.real("ridge", ridge, 0.0)  # a negative ridge makes the LoRA worse than none


def solve_lora(s: LayerStats, rank: int, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form rank-``rank`` LoRA (A [r, K], B [N, r]) minimising the layer's residual MSE."""
    if s.rows == 0:
        raise ValueError("no calibration rows for this layer")
    _check_fit_args(rank, ridge)
    for what, t in (("xtx", s.xtx), ("xtr", s.xtr)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"the calibration statistics ({what}) hold NaN or Inf; calibrate again")
    if not (math.isfinite(s.rr) and math.isfinite(s.yy)):
        raise ValueError("the calibration statistics (rr, yy) hold NaN or Inf; calibrate again")
    rank = min(rank, s.k, s.n)
    g = s.xtx.double() / s.rows
    c = s.xtr.double() / s.rows
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
    gr = g.clone()
    gr.diagonal().add_(lam)  # g + lam I without a [K, K] identity (fp64: 1.8 GB at K = 15360)
    m = torch.linalg.solve(gr, c)  # [K, N]
    del gr
    fitted = m.T @ g @ m  # [N, N], energy of x M per output direction
    evals, evecs = torch.linalg.eigh((fitted + fitted.T) / 2)
    v = evecs[:, -rank:].flip(-1)  # top-r, largest first
    return (m @ v).T.contiguous(), v.contiguous()


def residual_error(s: LayerStats, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> float:
    """Relative output error |Y - Y~| / |Y| of the layer on these statistics, with LoRA (a, b) or without."""
    err = s.rr
    if a is not None:
        g, c = s.xtx.double(), s.xtr.double()
        m = (b.double() @ a.double()).T.to(g.device)  # [K, N]
        err = s.rr - 2 * float((m * c).sum()) + float((m * (g @ m)).sum())
    return (max(err, 0.0) / max(s.yy, 1e-30)) ** 0.5


def fit_lora(transformer, stats, rank: int, ridge: float = 1e-3, val=None, progress: bool = True,
             device=None) -> list[dict]:
    """Give every sparse layer of ``transformer`` a rank-``rank`` LoRA solved from ``stats``.
    Returns per-layer rows in module order: error without / with LoRA (on ``val`` too when given).

    ``stats`` and ``val`` are :class:`CalibStats` in memory, or :class:`StatsFiles` / paths (a statistics file
    or a pass directory) read one activation site at a time onto ``device`` (default: the layer's), each freed before the next is
    read: the peak memory is the largest site's statistics, not the sum. Each LoRA depends on its own layer's
    statistics only, so the result is the same either way."""
    from tqdm.auto import tqdm

    _check_fit_args(rank, ridge)  # before any layer changes
    layers = sparse_layers(transformer)
    src = stats if isinstance(stats, (CalibStats, StatsFiles)) else StatsFiles(stats)
    vsrc = val if val is None or isinstance(val, (CalibStats, StatsFiles)) else StatsFiles(val)
    missing = [n for n in layers if n not in src.layers]
    if missing:  # checked before any layer changes
        raise ValueError(f"no calibration statistics for {len(missing)} layers, e.g. {missing[0]}")
    rows = {}
    with tqdm(total=len(layers), desc="lora", disable=not progress) as bar:
        for site in src.site_names():
            names = [n for n in site if n in layers]  # a narrower preset than the calibration's skips some
            if not names:
                continue
            dev = device or layers[names[0]].weight.device
            part = src.read(names, dev)
            vpart = vsrc.read([n for n in names if n in vsrc.layers], dev) if vsrc is not None else None
            for name in names:
                rows[name] = _fit_layer(name, layers[name], part.layers[name], rank, ridge,
                                        vpart.layers.get(name) if vpart is not None else None)
                bar.update()
            del part, vpart  # before the next site is read
    return [rows[n] for n in layers]


def _fit_layer(name: str, layer: SparseActLinear, s: LayerStats, rank: int, ridge: float,
               val: LayerStats | None) -> dict:
    try:
        a, b = solve_lora(s, rank, ridge)
    except ValueError as e:
        raise ValueError(f"layer {name}: {e}") from None
    layer.add_lora(a.shape[0])
    with torch.no_grad():
        layer.lora_A.copy_(a.to(layer.lora_A))
        layer.lora_B.copy_(b.to(layer.lora_B))
    row = {"layer": name, "rank": a.shape[0], "err_norm": residual_error(s), "err_lora": residual_error(s, a, b)}
    if val is not None:
        row["val_err_norm"] = residual_error(val)
        row["val_err_lora"] = residual_error(val, a, b)
    return row
