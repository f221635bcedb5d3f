"""benchmarks/linear.py's summary on made-up per-shape times (the timing itself needs an sm_90 GPU)."""

import math
from pathlib import Path

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_cusparselt_has_a_graph_column_like_dense_and_lynx():
    lin = load_benchmark("linear")
    rows = [dict(model="flux", M=4096, K=3072, N=3072, count_per_forward=1, flop_share=0.5),
            dict(model="flux", M=512, K=3072, N=3072, count_per_forward=1, flop_share=0.5)]
    per_shape = {}
    for r, (cslt, cslt_graph) in zip(rows, ((0.5, 1.2), (0.2, 0.9))):
        key = (r["M"], r["K"], r["N"])
        per_shape[key] = {"M": r["M"], "K": r["K"], "N": r["N"], "dense_ms": 1.0, "dense_graph_ms": 0.9,
                          "cslt_best_ms": 1 / cslt, "cslt_best_speedup": cslt,
                          "cslt_best_graph_ms": 0.9 / cslt_graph, "cslt_best_graph_speedup": cslt_graph}
    s = lin.summarize(rows, per_shape)["all"]
    assert math.isclose(s["cslt_best_graph_speedup_geomean"], math.sqrt(1.2 * 0.9))
    assert math.isclose(s["cslt_best_speedup_geomean"], math.sqrt(0.5 * 0.2))
    # forward-time ratio against the dense time of the same mode (graph vs graph)
    assert math.isclose(s["cslt_best_graph_forward_time_ratio"], 1.8 / (0.9 / 1.2 + 0.9 / 0.9))
    # a variant that ran on no shape (cuSPARSELt missing) has no geomean: JSON null, and the table prints n/a
    for r in per_shape.values():
        del r["cslt_best_ms"], r["cslt_best_speedup"]
    s = lin.summarize(rows, per_shape)["all"]
    assert s["cslt_best_speedup_geomean"] is None and "cslt_best_forward_time_ratio" not in s
    src = (ROOT / "benchmarks" / "linear.py").read_text()
    assert 'res["cslt_best_graph_ms"] = bench(graphed(' in src
