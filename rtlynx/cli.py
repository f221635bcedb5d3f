"""`rtlynx` command line (also `python -m rtlynx`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import COMMANDS


class Parser(argparse.ArgumentParser):
    """Every (sub)command: no abbreviated options (`demo --model x` must not become --model-dir) and help that
    shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rtlynx", description="RT-Lynx: online N:M activation sparsity for DiTs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # an optional extra is missing: keep the rest of the CLI working
            cmd = name.rsplit(".", 1)[-1].replace("_", "-")
            p = sub.add_parser(cmd, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda args, e=e, cmd=cmd: sys.exit(f"rtlynx {cmd} needs a missing package: {e}"))
            continue
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded by commands that write results
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
