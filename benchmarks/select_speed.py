"""This GPU's speed table for `rtlynx select`, and the selected set against dense end to end (issue 10).

    python benchmarks/select_speed.py [--models flux qwen-image z-image pixart-sigma sd35 wan2.1] [--reps 10]
                                      [--table benchmarks/results/speed_table_<gpu>.json] [--out ...json]

For each model (real config, random weights, bf16, 1024x1024): sparsify it with its widest preset, record every
site's GEMM shape (rows per call, K, N summed over the members) in one dense forward, time the missing shapes
(rtlynx.select.measure_speed_table: SparseActLinear against nn.Linear) into the table, then sparsify only the
sites that the table says gain (>= --min-speedup; random weights carry no quality cost, so this is the speed
side of `rtlynx select` alone) and time one forward dense and sparse (benchmarks/e2e.py's timer). The table
is written after every model, so a cut run keeps what it measured; copy it to the cache folder
(rtlynx.select.cached_table_path) or pass it to `rtlynx select --speed-table`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import rtlynx  # noqa: E402
from rtlynx import distill, select  # noqa: E402
from rtlynx.benchtools import run_metadata  # noqa: E402

# Models outside benchmarks/e2e.py: (class, config, forward inputs at 1024x1024 as a function of device, dtype)
EXTRA = {
    "pixart-sigma": ("PixArtTransformer2DModel", dict(
        sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4, out_channels=8,
        cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single", use_additional_conditions=False,
        patch_size=2), lambda d, t: dict(
        hidden_states=torch.randn(1, 4, 128, 128, device=d, dtype=t),
        encoder_hidden_states=torch.randn(1, 300, 4096, device=d, dtype=t), timestep=torch.tensor([500.0], device=d),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)),
    "sd35": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm"), lambda d, t: dict(
        hidden_states=torch.randn(1, 16, 128, 128, device=d, dtype=t),
        encoder_hidden_states=torch.randn(1, 333, 4096, device=d, dtype=t),
        pooled_projections=torch.randn(1, 2048, device=d, dtype=t), timestep=torch.tensor([500.0], device=d),
        return_dict=False)),
    # Wan2.1-14B (the class defaults), 832x480 with 17 frames (5 latent frames, 7800 tokens; 81 frames is 32760)
    "wan2.1": ("WanTransformer3DModel", dict(), lambda d, t: dict(
        hidden_states=torch.randn(1, 16, 5, 60, 104, device=d, dtype=t), timestep=torch.tensor([500], device=d),
        encoder_hidden_states=torch.randn(1, 512, 4096, device=d, dtype=t), return_dict=False)),
}


def build(kind: str):
    import diffusers
    import e2e

    from rtlynx.integrations.diffusers import example_inputs

    if kind in e2e.MODELS:
        model = e2e.build(kind)
        inputs = example_inputs(model, text_len=512, **e2e.MODELS[kind][2])
        if getattr(model.config, "guidance_embeds", False):
            inputs["guidance"] = torch.full((1,), 3.5, device="cuda")
        return model, inputs
    cls_name, cfg, make_inputs = EXTRA[kind]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = getattr(diffusers, cls_name)(**cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return model, make_inputs("cuda", torch.bfloat16)


def main(argv=None) -> int:
    import e2e

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["flux", "qwen-image", "z-image", "pixart-sigma", "sd35"],
                    help="models (default: flux qwen-image z-image pixart-sigma sd35)")
    ap.add_argument("--reps", type=int, default=10, help="timed forwards per variant (default: 10)")
    ap.add_argument("--min-speedup", type=float, default=1.02, help="site selection threshold (default: 1.02)")
    ap.add_argument("--table", default=None, help="speed table JSON to extend (default: benchmarks/results/"
                                                  "speed_table_<gpu>.json)")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/select_speed_<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("select_speed.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name(0)
    tag = gpu.split()[-1].lower()
    table_path = Path(args.table or ROOT / "benchmarks" / "results" / f"speed_table_{tag}.json")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"select_speed_{tag}.json")
    table = select.load_speed_table(table_path) if table_path.is_file() else {**run_metadata(), "device": gpu,
                                                                                   "rows": []}
    results = {**run_metadata(), "device": gpu, "torch": torch.__version__, "min_speedup": args.min_speedup,
               "models": {}}
    for kind in args.models:
        try:
            model, inputs = build(kind)
            dense_names = None
            preset = select.all_preset(type(model).__name__)
            rtlynx.sparsify(model, preset=preset)
            rows = select.calls_per_step(model, lambda: model(**inputs))
            groups = [g for g in distill.stat_groups(model) if g.layers[0] in rows]
            shapes = [(rows[g.layers[0]][0], g.k, sum(g.ns)) for g in groups]
            have = {(r["M"], r["K"], r["N"]) for r in table["rows"]}
            table["rows"] += select.measure_speed_table([s for s in set(shapes) if s not in have])["rows"]
            table_path.write_text(json.dumps(table, indent=1))
            fast = [g for g, s in zip(groups, shapes)
                    if (r := select.lookup(table, *s)) and r["dense_ms"] / r["lynx_linear_ms"] >= args.min_speedup]
            rtlynx.unsparsify(model)
            dense_names = [n for g in fast for n in g.layers]
            table_only = len(fast)

            # rtlynx select's end-to-end check: drop the sites of least table speed-up until not slower than dense
            rows_of = [(g, s, select.lookup(table, *s)) for g, s in zip(groups, shapes) if g in fast]
            cands = [select.Candidate(list(g.layers), *s, 1, 0.0, r["dense_ms"], r["lynx_linear_ms"])
                     for g, s, r in rows_of]
            time_with = select.timer_with_layers(model, lambda: e2e.time_forward(model, inputs, args.reps))
            kept, confirm_log = select.confirm_end_to_end(cands, time_with)
            dense_names = [n for c in kept for n in c.layers]
            fast = [g for g in fast if g.layers[0] in dense_names]
            entry = {"preset": preset, "sites": len(groups), "fast_sites_table": table_only, "end_to_end": confirm_log,
                     "fast_sites": len(fast), "fast_layers": len(dense_names),
                     "shapes": [{"M": m, "K": k, "N": n} for m, k, n in sorted(set(shapes))]}
            dense = e2e.time_forward(model, inputs, args.reps)
            entry["dense_ms"] = dense
            if fast:
                rtlynx.sparsify(model, preset=None, include=dense_names)
                sparse = e2e.time_forward(model, inputs, args.reps)
                entry["selected_ms"] = sparse
                entry["speedup"] = entry["dense_ms"] / entry["selected_ms"]
                rtlynx.unsparsify(model)
            rtlynx.sparsify(model, preset="auto")  # the hand-written default, for reference
            entry["default_preset_ms"] = e2e.time_forward(model, inputs, args.reps)
            entry["default_preset_speedup"] = entry["dense_ms"] / entry["default_preset_ms"]
            results["models"][kind] = entry
            print(kind, json.dumps({k: v for k, v in entry.items() if k != "shapes"}), flush=True)
        except Exception as e:  # one model failing (config, memory) must not lose the others
            results["models"][kind] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(kind, "FAILED", results["models"][kind]["error"], flush=True)
        finally:
            model = inputs = None
            torch.cuda.empty_cache()
        out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out} and {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
