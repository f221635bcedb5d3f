"""`rtlynx select` on the shipped mini-FLUX against the hand-written 'flux' preset, on the CPU (issue 10, item 2).

    python benchmarks/miniflux_select.py [--n 16] [--steps 10] [--budgets 0.5 1.0 1.5] [--dtype fp32]

There is no GPU here, so the speed side comes from the H200 table measured at full-size FLUX shapes
(benchmarks/results/speed_table_h200.json): the mini-FLUX is FLUX.1 scaled down (width 256 for 3072, 256 image and
16 text tokens for 4096 and 512), so each mini-FLUX site gets the dense / sparse ms of the full-size FLUX site of the
same role (FLUX_ROLES), written as a speed table in the mini-FLUX's own (M, K, N) keys. Its "saved ms" are thus
what those sites would save at FLUX shapes on an H200 (one call per forward, as in FLUX without CFG batching), for
the mini-FLUX's 4 double + 8 single blocks (FLUX.1 has 19 + 38).

Quality cost: rtlynx.select.select_layers without --calib (norm-compensated pruning error on a short dense
sampling of the demo prompts), no LoRA, no end-to-end check (confirm needs a GPU). Then every distinct layer set
(the 'flux' preset, the selection at each budget) samples the same prompts from the same noise, norm compensation,
no LoRA, reference backend, and is compared with dense by paired PSNR / SSIM (rtlynx.eval.fid.paired_metrics).
FID needs the GPU protocol (benchmarks/quality.py, 5000 images): not measured here.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's rtlynx, not an installed one

from rtlynx import api, distill, select  # noqa: E402
from rtlynx.benchtools import run_metadata  # noqa: E402
from rtlynx.config import SparsityConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
H200_TABLE = RESULTS / "speed_table_h200.json"

# FLUX.1-dev at 1024x1024: hidden width, MLP width, image tokens, text tokens (benchmarks/results/select_speed_h200.json
# "flux" "shapes" are these products).
W, MLP, IMG, TXT = 3072, 12288, 4096, 512
# role, glob on the site's first layer (fnmatch: '*' also matches dots), the full-size FLUX site's (M, K, N)
FLUX_ROLES = (
    ("double image Q/K/V", "transformer_blocks.*.attn.to_q", (IMG, W, 3 * W)),
    ("double image attention out", "transformer_blocks.*.attn.to_out.0", (IMG, W, W)),
    ("double image MLP up", "transformer_blocks.*.ff.net.0.proj", (IMG, W, MLP)),
    ("double image MLP down", "transformer_blocks.*.ff.net.2", (IMG, MLP, W)),
    ("double text Q/K/V", "transformer_blocks.*.attn.add_q_proj", (TXT, W, 3 * W)),
    ("double text attention out", "transformer_blocks.*.attn.to_add_out", (TXT, W, W)),
    ("double text MLP up", "transformer_blocks.*.ff_context.net.0.proj", (TXT, W, MLP)),
    ("double text MLP down", "transformer_blocks.*.ff_context.net.2", (TXT, MLP, W)),
    ("single Q/K/V + MLP up", "single_transformer_blocks.*.attn.to_q", (IMG + TXT, W, 3 * W + MLP)),
    ("single proj_out", "single_transformer_blocks.*.proj_out", (IMG + TXT, W + MLP, W)),
)


def flux_role(first_layer: str) -> tuple[str, tuple[int, int, int]]:
    """(role, full-size FLUX (M, K, N)) of the mini-FLUX site whose first layer is ``first_layer``."""
    for role, glob, shape in FLUX_ROLES:
        if fnmatch.fnmatchcase(first_layer, glob):
            return role, shape
    raise ValueError(f"no FLUX role for the site of {first_layer}: extend FLUX_ROLES")


def site_shapes(runner, candidate_preset: str = "flux-all", seed: int = 0) -> list[tuple[list[str], tuple]]:
    """(layers, (M, K, N)) of every candidate site of the mini-FLUX, as select_layers measures them (one sampling
    step of one prompt)."""
    transformer = runner.transformer
    api.sparsify(transformer, preset=candidate_preset)
    try:
        rows = select.calls_per_step(transformer, lambda: runner.sample(["a photo"], steps=1, seed=seed, latent=True))
        return [(list(g.layers), (rows[g.layers[0]][0], g.k, sum(g.ns)))
                for g in distill.stat_groups(transformer) if g.layers[0] in rows]
    finally:
        api.unsparsify(transformer)


def mapped_speed_table(sites, h200: dict) -> tuple[dict, list[dict]]:
    """A speed table in the mini-FLUX's (M, K, N) keys holding the H200 dense / sparse ms of the full-size FLUX site
    of the same role, and the mapping (one row per site). Raises if a FLUX shape is missing from ``h200`` or two
    roles share a mini-FLUX shape (the table could not tell them apart)."""
    exact = {(r["M"], r["K"], r["N"]): r for r in h200["rows"]}
    rows, mapping = {}, []
    for layers, shape in sites:
        role, flux = flux_role(layers[0])
        if flux not in exact:
            raise ValueError(f"the H200 table has no row for FLUX shape {flux} ({role})")
        src = exact[flux]
        row = {"M": shape[0], "K": shape[1], "N": shape[2], "dense_ms": src["dense_ms"],
               "lynx_linear_ms": src["lynx_linear_ms"], "role": role, "flux_shape": list(flux)}
        if shape in rows and rows[shape]["role"] != role:
            raise ValueError(f"mini-FLUX shape {shape} has two roles: {rows[shape]['role']} and {role}")
        rows[shape] = row
        mapping.append({"layers": layers, "mini_shape": list(shape), "role": role, "flux_shape": list(flux),
                        "dense_ms": src["dense_ms"], "lynx_linear_ms": src["lynx_linear_ms"]})
    table = {"device": f"{h200.get('device', 'H200')} (FLUX shapes mapped onto the mini-FLUX)",
             "source": str(H200_TABLE.relative_to(ROOT)), "rows": list(rows.values())}
    return table, mapping


def main(argv=None) -> int:
    from rtlynx import demo
    from rtlynx.eval.fid import paired_metrics
    from rtlynx.models.miniflux import to_uint8
    from rtlynx.pipelines import load_runner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="images per variant (the demo prompts, repeated)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps of the comparison")
    ap.add_argument("--select-steps", type=int, default=4, help="sampling steps of the quality-cost measurement")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (a shared machine)")
    ap.add_argument("--out", default=str(RESULTS / "miniflux_select_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    runner = load_runner("miniflux", device="cpu", dtype=dtype)
    model, transformer = runner.model, runner.transformer
    table, mapping = mapped_speed_table(site_shapes(runner, seed=args.seed), select.load_speed_table(H200_TABLE))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table_file = Path(args.out).with_name(Path(args.out).stem + "_speed_table.json")
    table_file.write_text(json.dumps(table, indent=1))
    print(f"speed table ({len(table['rows'])} mini-FLUX shapes from {table['source']}) -> {table_file}")

    # layer sets to sample: the hand-written preset, then each budget's selection (identical sets sampled once)
    flux_layers = api.eligible_layers(transformer, SparsityConfig(preset="flux"))
    sets = {"flux_preset": flux_layers}
    selections = {}
    # one quality-cost measurement (select_layers at the first budget); the other budgets re-run its knapsack
    t0 = time.time()
    sel = select.select_layers(runner, budget=args.budgets[0], speed_table=table_file, prompts=demo.DEMO_PROMPTS,
                               steps=args.select_steps, seed=args.seed, confirm=False)
    seconds_select = time.time() - t0
    ref = {"predicted_saved_ms": sel["reference_saved_ms"], "cost": sel["reference_cost"]}
    for budget in args.budgets:
        sel["budget"] = budget * sel["reference_cost"]
        sel["selected"] = select.select_sites(sel["candidates"], sel["budget"])
        print(select.report(sel))
        layers = [n for c in sel["selected"] for n in c.layers]
        name = f"selected_{budget:g}"
        selections[name] = {"budget": budget, "layers": layers, "sites": len(sel["selected"]),
                            "predicted_saved_ms": sum(c.saved_ms for c in sel["selected"]),
                            "cost": sum(c.cost for c in sel["selected"]), "budget_abs": sel["budget"]}
        sets[name] = layers

    prompts = (demo.DEMO_PROMPTS * (args.n // len(demo.DEMO_PROMPTS) + 1))[:args.n]
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.n, model.grid ** 2, model.config["patch_size"] ** 2 * model.config["channels"], generator=g)

    def sample(label):
        t0 = time.time()
        with torch.no_grad():
            imgs = to_uint8(model.sample(prompts, num_steps=args.steps, noise=noise, progress=label)).cpu()
        return imgs, time.time() - t0

    images, seconds = {}, {}
    images["dense"], seconds["dense"] = sample("dense")
    sampled = {}  # frozenset of layers -> variant that sampled it
    variants = {}
    for name, layers in sets.items():
        key = frozenset(layers)
        if key in sampled:
            images[name], seconds[name] = images[sampled[key]], 0.0
        else:
            api.sparsify(transformer, preset=None, include=list(layers), compensation="norm", speed_rules=False)
            try:
                images[name], seconds[name] = sample(name)
            finally:
                api.unsparsify(transformer)
            sampled[key] = name
        pair = paired_metrics(images[name], images["dense"])
        info = ref if name == "flux_preset" else selections[name]
        variants[name] = {"psnr": pair["psnr"], "ssim": pair["ssim"], "layers": len(layers),
                          "same_set_as": sampled[key] if sampled[key] != name else None,
                          "seconds_sample": seconds[name], **{k: v for k, v in info.items() if k != "layers"}}
        print(f"{name:16s} {len(layers):3d} layers  PSNR {pair['psnr']:.2f} dB  SSIM {pair['ssim']:.4f}  predicted "
              f"saved {info['predicted_saved_ms']:.3f} ms / forward at FLUX shapes (H200)", flush=True)

    result = {**run_metadata(), "model": "mini-FLUX (rtlynx/assets/miniflux)", "n": args.n, "steps": args.steps,
              "select_steps": args.select_steps, "seconds_select": seconds_select, "dtype": args.dtype, "seed": args.seed, "threads": args.threads,
              "backend": "reference", "compensation": "norm", "lora": None,
              "quality_cost": "select_layers without calib: norm-compensated output error on a dense sampling of "
                              f"the {len(demo.DEMO_PROMPTS)} demo prompts, {args.select_steps} steps",
              "speed_table": str(table_file.relative_to(ROOT)) if table_file.is_relative_to(ROOT) else str(table_file),
              "fid_note": "FID needs the GPU protocol (benchmarks/quality.py, 5000 images): not measured",
              "saved_ms_note": "sum over the variant's sites of calls x (dense - sparse) ms from the H200 table at the "
                               "full-size FLUX shape of each site's role; the mini-FLUX has 4 double + 8 single blocks",
              "flux_preset_layers": flux_layers, "selected_layers": {k: v["layers"] for k, v in selections.items()},
              "site_mapping": mapping, "variants": variants, "seconds_total": time.time() - t_start}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
