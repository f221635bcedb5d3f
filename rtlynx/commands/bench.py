"""`rtlynx bench`: the linear-layer benchmark of the lynx Hopper kernels (benchmarks/linear.py)."""
from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser("bench", help="benchmark lynx kernels vs cuBLAS / cuSPARSELt (needs an sm_90 GPU)")
    p.add_argument("--csv", default=None, help="shapes CSV (none: benchmarks/shapes_1024.csv)")
    p.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/h100_linear.json)")
    p.add_argument("--sweep", action="store_true", help="time every compiled GEMM config per shape")
    p.add_argument("--quick", action="store_true", help="shorter timings")
    p.add_argument("--shapes", default="", help="only these MxKxN triples, ';'-separated")
    p.set_defaults(func=_bench)


def _bench(args):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "linear.py"
    if not script.exists():
        print(f"benchmarks/linear.py not found next to the package ({script}); run from a source checkout")
        return 2
    spec = importlib.util.spec_from_file_location("rtlynx_bench_linear", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = []
    for flag in ("csv", "out"):
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    argv += ["--sweep"] * args.sweep + ["--quick"] * args.quick
    if args.shapes:
        argv += ["--shapes", args.shapes]
    return mod.main(argv)
