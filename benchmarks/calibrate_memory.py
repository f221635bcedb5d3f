"""Peak GPU memory and time per prompt of `rtlynx calibrate` at full size (issue 10).

    python benchmarks/calibrate_memory.py [--model flux] [--max-stats-gb 0 40] [--prompts 2] [--steps 4]
                                          [--out benchmarks/results/calibrate_memory_<gpu>.json] [--tiny]

Builds the real transformer (FLUX.1-dev by default: the diffusers class defaults, guidance embedding on; see
benchmarks/e2e.py) with random weights in bf16, sparsifies it with the default preset and, for each statistics
budget (0 = one pass), runs every pass of the memory plan (rtlynx.distill.plan) the way `rtlynx calibrate` does:
``steps`` transformer forwards per prompt at 1024x1024 with a 512-token prompt (the sampler's own work is
negligible next to them), streaming the pass's statistics. Records per pass: planned statistics bytes, peak
allocated memory, seconds per prompt with statistics and dense without. Time does not depend on the weight
values. ``--tiny`` runs the tiny config on the CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import rtlynx  # noqa: E402
from rtlynx import distill  # noqa: E402
from rtlynx.benchtools import run_metadata  # noqa: E402
from rtlynx.integrations.diffusers import example_inputs  # noqa: E402

GIB = 2 ** 30


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_prompts(model, inputs, prompts: int, steps: int):
    with torch.no_grad():
        for _ in range(prompts * steps):
            model(**inputs)


def write_plans(preset: str, budgets, out: Path) -> int:
    """The memory plan (rtlynx.distill.plan) of each full-size model, built without weights."""
    import diffusers
    import e2e

    plans = {}
    for kind, (cls_name, cfg, _) in e2e.MODELS.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls_name)(**cfg)
        rtlynx.sparsify(model, preset=preset)
        plans[kind] = {"sparse_layers": len(rtlynx.sparse_layers(model)), "budgets": {
            str(b or None): [x / GIB for x in distill.plan(model, b or None).pass_bytes()] for b in budgets}}
        print(kind, json.dumps(plans[kind]))
    out.write_text(json.dumps({**run_metadata(), "preset": preset, "unit": "GiB per pass (fp32 statistics)",
                               "models": plans}, indent=1))
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    import e2e

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="flux", choices=tuple(e2e.MODELS), help="model (default: flux)")
    ap.add_argument("--preset", default="auto", help="layers to calibrate (default: auto)")
    ap.add_argument("--max-stats-gb", type=float, nargs="+", default=[0.0, 40.0],
                    help="statistics budgets to measure, 0 = no limit (default: 0 40)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per pass (default: 2)")
    ap.add_argument("--steps", type=int, default=4, help="transformer forwards per prompt (default: 4)")
    ap.add_argument("--text-len", type=int, default=512, help="prompt tokens (default: 512)")
    ap.add_argument("--out", default=None, help="JSON (default: benchmarks/results/calibrate_memory_<gpu>.json)")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU: a smoke test (default: off)")
    ap.add_argument("--plan-only", action="store_true",
                    help="only the planned statistics memory of flux / qwen-image / z-image (built on the meta "
                         "device, no GPU) -> benchmarks/results/calibrate_plan.json (default: off)")
    args = ap.parse_args(argv)
    if args.plan_only:
        return write_plans(args.preset, args.max_stats_gb, Path(args.out or ROOT / "benchmarks" / "results" /
                                                                "calibrate_plan.json"))

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"calibrate_memory_{name.split()[-1].lower() if cuda else 'cpu'}.json")
    model = e2e.build(args.model, device=device, tiny=args.tiny)
    size = dict(height=4, width=4) if args.tiny else e2e.MODELS[args.model][2]
    inputs = example_inputs(model, text_len=8 if args.tiny else args.text_len, **size)
    if getattr(model.config, "guidance_embeds", False):
        inputs["guidance"] = torch.full((1,), 3.5, device=device)
    rtlynx.sparsify(model, preset=args.preset)
    weights = torch.cuda.memory_allocated() / GIB if cuda else None
    # dense seconds per prompt (the sampling alone), after a warm-up forward
    run_prompts(model, inputs, 1, 1)
    _sync()
    t = time.perf_counter()
    with rtlynx.dense_mode(model):
        run_prompts(model, inputs, args.prompts, args.steps)
    _sync()
    dense_s = (time.perf_counter() - t) / args.prompts
    result = {**run_metadata(), "device": name, "torch": torch.__version__, "model": args.model, "tiny": args.tiny,
              "preset": args.preset, "steps_per_prompt": args.steps, "prompts_per_pass": args.prompts,
              "text_len": args.text_len, "tokens": next(iter(inputs.values())).shape[1],
              "sparse_layers": len(rtlynx.sparse_layers(model)), "weights_gib": weights,
              "dense_s_per_prompt": dense_s, "budgets": []}
    for budget in args.max_stats_gb:
        plan = distill.plan(model, budget or None)
        print(plan.report(), flush=True)
        row = {"max_stats_gb": budget or None, "passes": []}
        for p, groups in enumerate(plan.passes):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            _sync()
            t = time.perf_counter()
            try:
                stats = distill.collect(model, lambda: run_prompts(model, inputs, args.prompts, args.steps),
                                        groups=groups)
            except torch.cuda.OutOfMemoryError:
                stats = None
                row["passes"].append({"pass": p + 1, "oom": True, "planned_stats_gib": plan.pass_bytes()[p] / GIB})
                print(f"pass {p + 1}: out of memory", flush=True)
                torch.cuda.empty_cache()
                break
            _sync()
            sec = (time.perf_counter() - t) / args.prompts
            entry = {"pass": p + 1, "layers": sum(len(g.layers) for g in groups),
                     "planned_stats_gib": plan.pass_bytes()[p] / GIB, "s_per_prompt": sec,
                     "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None}
            row["passes"].append(entry)
            print(json.dumps(entry), flush=True)
            del stats
        done = [e for e in row["passes"] if not e.get("oom")]
        row["s_per_prompt_all_passes"] = sum(e["s_per_prompt"] for e in done) if len(done) == len(plan.passes) else None
        row["peak_gib"] = max((e["peak_gib"] or 0) for e in done) if cuda and done else None
        result["budgets"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every budget: a cut run keeps what it measured
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
