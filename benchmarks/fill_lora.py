"""Compose a "fill" compensation LoRA: each site's members at the largest rank whose tail segment stays 64 rows
(rtlynx.sites.operand.TAIL_ALIGN pads sum(ranks) to 64), so on the bf16 site kernels it costs what rank 8 costs.

A site of n members (layers sharing one input) gets rank 64 // n: one layer 64, three (double-block Q/K/V) 21, four
(single-block Q/K/V + MLP up) 16. The LoRAs come from closed-form saves of those ranks on the same calibration
(`rtlynx train-lora --rank R`), one per rank; the closed form of each layer depends on its own statistics only, so
taking each layer's factors from the save of its rank is the per-layer optimum at that rank.

    python benchmarks/fill_lora.py --lora-dir /tmp/cf/lora_r{rank} --out /tmp/cf/lora_fill   # {rank} filled in
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx

from rtlynx import api, io, sites  # noqa: E402
from rtlynx.sites.operand import TAIL_ALIGN as TAIL_ROWS, fill_rank  # noqa: E402
from rtlynx.models.miniflux import load_miniflux  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora-dir", required=True, help="closed-form saves, '{rank}' standing for the rank")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t = load_miniflux().transformer
    ranks = {n: fill_rank(n) for n in range(1, 5)}
    io.load(t, args.lora_dir.format(rank=ranks[1]), dense_below_t=None, backend="reference")
    names = {id(l): n for n, l in api.sparse_layers(t).items()}
    cache, used = {}, Counter()
    for s in sites.model_sites(t):
        r = ranks[len(s.layers)]
        used[r] += len(s.layers)
        if r == ranks[1]:
            continue
        f = cache.setdefault(r, load_file(Path(args.lora_dir.format(rank=r)) / "rtlynx_lora.safetensors"))
        for layer in s.layers:
            name = names[id(layer)]
            layer.add_lora(r, rebuild=False)
            with torch.no_grad():
                layer.lora_A.copy_(f[f"{name}.lora_A"])
                layer.lora_B.copy_(f[f"{name}.lora_B"])
        s.build()
    assert all(s.rp == TAIL_ROWS for s in sites.model_sites(t)), "a site's tail grew past 64 rows"
    io.save(t, args.out, overwrite=True)
    print(f"wrote {args.out}: layers per rank {dict(sorted(used.items()))}, every site's tail {TAIL_ROWS} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
