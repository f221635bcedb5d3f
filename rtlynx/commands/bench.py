"""`rtlynx bench`: the linear-layer benchmark of the lynx Hopper kernels (benchmarks/linear.py).

The benchmark script lives in the source checkout, not in the wheel: the command runs it from the checkout rtlynx
was installed from (editable install) or from ./benchmarks/ in the working folder, and otherwise says where to
get it. Results go to the working folder unless --out says otherwise (never into the checkout's committed results).
"""
from __future__ import annotations

from pathlib import Path

from . import help_of


DEFAULT_OUT = "rtlynx-bench-linear.json"


def register(subparsers):
    p = subparsers.add_parser("bench", help=help_of("bench"))
    p.add_argument("--csv", default=None, help="shapes CSV (none: benchmarks/shapes_1024.csv)")
    p.add_argument("--out", default=None,
                   help=f"JSON output (none: ./{DEFAULT_OUT}, or a fresh -N name if that file exists)")
    p.add_argument("--sweep", action="store_true", help="time every compiled GEMM config per shape")
    p.add_argument("--quick", action="store_true", help="shorter timings")
    p.add_argument("--shapes", default="", help="only these MxKxN triples, ';'-separated")
    p.set_defaults(func=_bench)


def find_script() -> Path | None:
    """benchmarks/linear.py of the checkout this rtlynx runs from, else of the working folder."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        script = root / "benchmarks" / "linear.py"
        if script.is_file():
            return script
    return None


def default_out(cwd: Path | None = None) -> Path:
    out = Path(cwd or Path.cwd()) / DEFAULT_OUT
    i = 2
    while out.exists():  # an earlier run's results are never overwritten without being asked
        out = out.with_name(f"{Path(DEFAULT_OUT).stem}-{i}.json")
        i += 1
    return out


def _bench(args):
    import importlib.util

    script = find_script()
    if script is None:
        raise SystemExit("rtlynx bench: benchmarks/linear.py is not installed with the package; run it from a source "
                         "checkout of rtlynx (`pip install -e .` there, or `python benchmarks/linear.py`)")
    spec = importlib.util.spec_from_file_location("rtlynx_bench_linear", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--out", str(Path(args.out) if args.out else default_out())]
    if args.csv:
        argv += ["--csv", args.csv]
    argv += ["--sweep"] * args.sweep + ["--quick"] * args.quick
    if args.shapes:
        argv += ["--shapes", args.shapes]
    return mod.main(argv)
