"""The quality ladder of the mini-FLUX: FID over dense for each compensation measured so far, every step sparse and
with the final steps dense (t < 0.2), read from the results files the quality runs wrote (nothing typed in here).

    python benchmarks/quality_ladder.py      # -> benchmarks/results/quality_ladder.png and quality_ladder.json

Every row is the 5,000-image protocol of benchmarks/quality.py (30 steps, Emoji-64, dense FID 16.62 on both cards);
the rows came from different runs and two cards (H200, H100), which the JSON names per row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# label -> (file, variant every step sparse, file, variant with t < 0.2 dense); None where not measured
LADDER = {
    "activation 2:4 (naive)": ("quality.json", "act24", "quality_dense_t0.2.json", "act24"),
    "RT-Lynx, closed-form LoRA (shipped to v20)": ("quality.json", "rtlynx", "quality_dense_t0.2.json", "rtlynx"),
    "RT-Lynx, centred closed form": ("quality_centre_token_mean.json", "rtlynx", "quality_centre_token_mean.json",
                                     "rtlynx_t0.2"),
    "RT-Lynx, global distillation (step 200)": ("quality_global_step200.json", "every_step/rtlynx",
                                                "quality_global_step200.json", "every_step/rtlynx_t0.2"),
    "RT-Lynx, centred + global (step 200)": ("centre_global_h100_logs/quality_velocity.json", "rtlynx",
                                             "centre_global_h100_logs/quality_velocity.json", "rtlynx_t0.2"),
    "RT-Lynx, centred + global (500 steps, shipped)": ("centre_global_h100_logs/quality_velocity500.json", "rtlynx",
                                                       "centre_global_h100_logs/quality_velocity500.json",
                                                       "rtlynx_t0.2"),
}
GOALS = {"every_step": 1.5, "t0.2": 1.05}  # issue 18's goals, FID over dense


def _row(doc: dict, key: str) -> tuple[dict, dict]:
    """(the variant's row, the run it sits in): ``"every_step/rtlynx"`` reads a run nested in a summary file."""
    run = doc
    if "/" in key:
        part, key = key.split("/")
        run = doc[part]
    return run["variants"][key], run


def ladder(results: Path = RESULTS) -> list[dict]:
    rows = []
    for label, (f1, v1, f2, v2) in LADDER.items():
        row = {"label": label}
        for tag, f, v in (("every_step", f1, v1), ("t0.2", f2, v2)):
            got, run = _row(json.loads((results / f).read_text()), v)
            dense = run["variants"].get("dense")  # the dense row of the same run, where it has one
            row[tag] = {"fid": got["fid"], "file": f, "variant": v, "device": run.get("device"),
                        "dense_fid": dense["fid"] if dense else None,
                        "over_dense": got["fid"] / dense["fid"] if dense else None}
        rows.append(row)
    return rows


def plot(rows: list[dict], out: Path, dense_fid: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    labels = [r["label"] for r in rows]
    for ax, tag, title in zip(axes, ("every_step", "t0.2"), ("every step sparse", "final steps dense (t < 0.2)")):
        fids = [r[tag]["fid"] for r in rows]
        bars = ax.barh(range(len(rows)), fids, color=["#999999"] + ["#4c72b0"] * (len(rows) - 1))
        ax.axvline(dense_fid, color="black", lw=1, ls="--")
        ax.axvline(dense_fid * GOALS[tag], color="#2ca02c", lw=1, ls=":")
        ax.text(dense_fid, -0.55, f" dense {dense_fid:.2f}", fontsize=8, va="bottom")
        ax.text(dense_fid * GOALS[tag], len(rows) - 0.45, f" goal {GOALS[tag]}x", fontsize=8, color="#2ca02c")
        for b, f in zip(bars, fids):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {f:.1f} ({f / dense_fid:.2f}x)", va="center",
                    fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("FID vs Emoji-64 (lower is better)")
        ax.set_xlim(0, max(fids) * 1.3)
        ax.set_ylim(len(rows) - 0.4, -0.8)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    fig.suptitle("mini-FLUX, 5,000 images, 30 steps: what each compensation buys", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder holding the quality results files")
    ap.add_argument("--out", default=str(RESULTS / "quality_ladder.png"))
    args = ap.parse_args(argv)
    from rtlynx.benchtools import run_metadata

    rows = ladder(Path(args.results))
    dense = {r[t]["dense_fid"] for r in rows for t in ("every_step", "t0.2") if r[t]["dense_fid"] is not None}
    if len({round(d, 4) for d in dense}) != 1:
        raise SystemExit(f"the runs disagree on the dense FID ({sorted(dense)}): not one protocol")
    out = Path(args.out)
    plot(rows, out, dense.pop())
    out.with_suffix(".json").write_text(json.dumps({**run_metadata(), "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['label']:46s} every step {r['every_step']['fid']:6.2f}   t < 0.2 {r['t0.2']['fid']:6.2f}")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
