"""Two builds, one machine: the e2e FLUX.1-dev compiled forward of an older commit against this one.

`benchmarks/e2e_session.sh ab` runs `benchmarks/fp8.py e2e` (dense and RT-Lynx FP8 sites, regional compile) from an
older tree with its own kernel library and from this tree with its own, alternating (old, new, old, new), on one
machine. This script merges the two result files into one table and JSON: per round the milliseconds of each
variant, then the medians over rounds, and `new_over_old_ms` of each variant (1.00 = the same speed; below 1 the new
build is faster). The dense rows measure the machine's drift: they run the same code in both trees (diffusers and
torch), so a dense difference between old and new is noise, and bounds what an RT-Lynx difference means.

    python benchmarks/build_ab.py --old ab_old.json --new ab_new.json --out benchmarks/results/build_ab_<device>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rtlynx

from rtlynx.benchtools import run_metadata  # noqa: E402


def runs(path: Path) -> list[dict]:
    """The e2e runs of a fp8.py results file (each: identity, protocol, rows)."""
    doc = json.loads(path.read_text())
    return doc.get("e2e_runs", [])


def merge(old: list[dict], new: list[dict]) -> dict:
    if not old or not new:
        raise SystemExit("each file needs at least one e2e run")
    ident = {"old": old[0]["identity"], "new": new[0]["identity"]}
    devices = {i["device"] for i in ident.values()}
    if len(devices) != 1:
        raise SystemExit(f"the two builds ran on different devices: {sorted(devices)}")
    variants = [r["variant"] for r in new[0]["rows"]]
    rounds = []
    for i, (o, n) in enumerate(zip(old, new)):
        row = {"round": i + 1}
        for side, run in (("old", o), ("new", n)):
            for r in run["rows"]:
                row[f"{side} {r['variant']} ms"] = r.get("ms")
        rounds.append(row)
    summary = {}
    for v in variants:
        med = {}
        for side in ("old", "new"):
            vals = [r[f"{side} {v} ms"] for r in rounds if r.get(f"{side} {v} ms")]
            med[side] = statistics.median(vals) if vals else None
        summary[f"{v} old ms"] = med["old"]
        summary[f"{v} new ms"] = med["new"]
        summary[f"{v} new_over_old_ms"] = med["new"] / med["old"] if med["old"] and med["new"] else None
        for side in ("old", "new"):  # the speed-up over dense within each build's own runs
            d = summary.get(f"dense {side} ms")
            if v != "dense" and d and med[side]:
                summary[f"{v} {side} vs_dense"] = d / med[side]
    return {"device": devices.pop(), "identity": ident, "merged_by": run_metadata(), "rounds": rounds, "summary": summary,
            "protocol": {k: new[0].get(k) for k in ("model", "mode", "compile", "compile_mode", "reps", "resolution",
                                                    "text_len")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, type=Path, nargs="+", help="fp8.py e2e outputs of the old build (rounds)")
    p.add_argument("--new", required=True, type=Path, nargs="+", help="the same of the new build, in the same order")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    doc = merge([r for f in a.old for r in runs(f)], [r for f in a.new for r in runs(f)])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{doc['device']}: old {doc['identity']['old']['commit']} vs new {doc['identity']['new']['commit']}")
    for r in doc["rounds"]:
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    for k, v in doc["summary"].items():
        print(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
