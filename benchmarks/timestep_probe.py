"""Timestep-aware compensation, at the layer level (issue 18 item 2; CPU is enough).

The grain that FID punishes is made on the last, low-noise steps (fid_ablation.json). Would a compensation that knows
the noise level do better there than the one shared LoRA? Records the inputs of the shipped mini-FLUX's 60 sparse
layers with the noise level t of each call (dense sampler), splits the prompts into a calibration half (even index)
and a held-out half, and measures on the held-out rows of each noise bucket the relative output error
``|x W^T - (s x~ W^T + x A^T B^T)| / |x W^T|`` (mean over layers) of:

- ``norm``: the norm scale alone (no LoRA);
- ``shared``: one closed-form rank-r LoRA fitted on all buckets (rtlynx.distill.solve_lora: what ships);
- ``shared+gain``: the same LoRA times one scalar per bucket (least squares on the bucket's calibration rows): the
  cheapest timestep-aware change (the tail's B scaled per step);
- ``per-bucket``: a closed-form LoRA per bucket (the most a per-timestep LoRA of this rank can do at the layer level).

    python benchmarks/timestep_probe.py [--prompts 8 --steps 10 --rank 8 --every 7]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx

from rtlynx import api, schedule  # noqa: E402
from rtlynx.benchtools import run_metadata  # noqa: E402
from rtlynx.demo import DEMO_PROMPTS  # noqa: E402
from rtlynx.distill import LayerStats, solve_lora  # noqa: E402
from rtlynx.models.miniflux import load_miniflux  # noqa: E402
from rtlynx.reference import nm as R  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selection_scores import record  # noqa: E402  the recorder of the layer inputs

RESULTS = Path(__file__).resolve().parent / "results"
BUCKETS = ((0.0, 0.2), (0.2, 0.5), (0.5, 1.01))  # noise level t: final steps, middle, first steps


def bucket_of(t: float) -> int:
    return next(i for i, (lo, hi) in enumerate(BUCKETS) if lo <= t < hi)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--every", type=int, default=7, help="keep every n-th token row")
    ap.add_argument("--out", default=str(RESULTS / "timestep_probe_cpu.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(0)
    model = load_miniflux()
    api.sparsify(model.transformer, backend="reference", speed_rules=False)
    layers = api.sparse_layers(model.transformer)
    prompts = (DEMO_PROMPTS * ((args.prompts + len(DEMO_PROMPTS) - 1) // len(DEMO_PROMPTS)))[: args.prompts]
    rows = record(model, prompts, args.steps, args.every,
                  label=lambda mod, a, kw: bucket_of(schedule.noise_level(mod, a, kw)), labels=len(BUCKETS))
    kinds = ("norm", "shared", "shared+gain", "per-bucket")
    err = {k: [[] for _ in BUCKETS] for k in kinds}
    for name, per in rows.items():
        layer = layers[name]
        w = layer.dense_weight().detach().float()
        cal = [torch.cat([x for p in per[0::2] for x in p[b]]) for b in range(len(BUCKETS))]
        held = [torch.cat([x for p in per[1::2] for x in p[b]]) for b in range(len(BUCKETS))]

        def stats(xs):
            s = LayerStats.empty(w.shape[1], w.shape[0])
            for x in xs:
                s.add(x, layer)
            return s

        def resid(x):
            xp = R.prune_nm(x, 2, 4)
            return (x - xp * R.norm_scale(x, xp)[:, None]) @ w.T

        a, b = solve_lora(stats(cal), args.rank)
        a, b = a.float(), b.float()
        for i in range(len(BUCKETS)):
            x, y = held[i], held[i] @ w.T
            r, lora = resid(x), (x @ a.T) @ b.T
            rc, lc = resid(cal[i]), (cal[i] @ a.T) @ b.T
            gain = float((rc * lc).sum() / (lc * lc).sum().clamp_min(1e-30))
            ab = solve_lora(stats([cal[i]]), args.rank)
            own = (x @ ab[0].float().T) @ ab[1].float().T
            yn = float(y.norm())
            err["norm"][i].append(float(r.norm()) / yn)
            err["shared"][i].append(float((r - lora).norm()) / yn)
            err["shared+gain"][i].append(float((r - gain * lora).norm()) / yn)
            err["per-bucket"][i].append(float((r - own).norm()) / yn)
    mean = {k: [sum(v) / len(v) for v in err[k]] for k in kinds}
    names = [f"t in [{lo}, {min(hi, 1.0)}]" for lo, hi in BUCKETS]
    out = {**run_metadata(), "device": "cpu", "model": "shipped mini-FLUX, 60 sparse layers (preset flux)",
           "prompts": len(prompts), "steps": args.steps, "rank": args.rank, "every": args.every, "buckets": names,
           "mean_rel_error": {k: dict(zip(names, v)) for k, v in mean.items()},
           "per_bucket_vs_shared": {n: mean["per-bucket"][i] / mean["shared"][i] - 1 for i, n in enumerate(names)},
           "gain_vs_shared": {n: mean["shared+gain"][i] / mean["shared"][i] - 1 for i, n in enumerate(names)},
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"{'':14s}" + "".join(f"{n:>18s}" for n in names))
    for k in kinds:
        print(f"{k:14s}" + "".join(f"{v:18.4f}" for v in mean[k]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
