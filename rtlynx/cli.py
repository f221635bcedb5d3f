"""`rtlynx` command line (also `python -m rtlynx`).

Only the module of the command being run is imported (torch and the models load inside the command), so
`rtlynx --help` and argument errors answer at once."""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import COMMANDS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: not where its help already says "(default: ...)", nor for hidden aliases."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every (sub)command: no abbreviated options (`demo --model x` must not become --model-dir) and help that
    shows each option's default once."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only`` (a command name) just that command's options are registered, the others
    appear with their help line."""
    parser = Parser(prog="rtlynx", description="RT-Lynx: online N:M activation sparsity for DiTs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    wanted = {m for c, (m, _) in COMMANDS.items() if only is None or c == only}
    for cmd, (name, help_line) in COMMANDS.items():
        if cmd in sub.choices:  # registered with another command of its module (calibrate, train-lora)
            continue
        if name not in wanted:
            sub.add_parser(cmd, help=help_line)  # listed in `rtlynx --help`; never run
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # an optional extra is missing: keep the rest of the CLI working
            p = sub.add_parser(cmd, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda args, e=e, cmd=cmd: sys.exit(f"rtlynx {cmd} needs a missing package: {e}"))
            continue
        module.register(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option), if it is one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = _command(argv)
    parser = build_parser(only=cmd or "")
    args = parser.parse_args(argv)
    args.argv = argv  # recorded by commands that write results
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
