"""`rtlynx build`: compile the lynx Hopper kernels ahead of time (else the first kernel call does, for 1-2 min)."""

from __future__ import annotations

import argparse
import os

from . import help_of


DESCRIPTION = ("Compile csrc/*.cu with nvcc into the cached kernel library. Needs nvcc and the CUTLASS headers, "
               "not a GPU: with --no-link the objects can be built on any machine and carried to the GPU machine's "
               "build dir (see rtlynx/ops/_build.py).")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from rtlynx.ops import _build

    p.add_argument("--jobs", "-j", type=int, default=_build.default_jobs(),
                   help="parallel nvcc processes (MAX_JOBS or the CPU count)")
    p.add_argument("--build-dir", default=str(_build.build_dir()),
                   help="cache folder (RTLYNX_BUILD_DIR or ~/.cache/rtlynx/sm90)")
    p.add_argument("--no-link", action="store_true", help="compile the objects only (no GPU machine needed)")
    p.add_argument("--verbose", "-v", action="store_true", help="print each unit as it finishes")


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help=help_of("build"), description=DESCRIPTION)
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from rtlynx.ops import _build

    os.environ["RTLYNX_BUILD_DIR"] = args.build_dir
    try:
        tc = _build.toolchain()
        print(f"nvcc {tc['nvcc_version']} ({tc['nvcc']}), CUTLASS {tc['cutlass_version']} ({tc['cutlass_include']}), "
              f"target {tc['arch']}, build dir {args.build_dir}", flush=True)
        path = _build.build(verbose=args.verbose, link=not args.no_link, jobs=args.jobs, progress=True)
    except _build.BuildError as e:
        raise SystemExit(f"rtlynx build: {e}") from None
    print(path)
    return 0


def main(argv=None) -> int:
    """``python -m rtlynx.ops._build``: the same command."""
    p = argparse.ArgumentParser(prog="python -m rtlynx.ops._build", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_arguments(p)
    return run(p.parse_args(argv))
