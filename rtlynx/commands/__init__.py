"""CLI subcommands: each module listed here has ``register(subparsers)`` adding its subparser with
``set_defaults(func=...)``. Modules that fail to import (optional extras missing) are skipped, and
the command tells the user what to install instead of crashing the whole CLI."""

COMMANDS = [
    "rtlynx.commands.info",
    "rtlynx.commands.analyze",
    "rtlynx.commands.data",
    "rtlynx.commands.train_reference",
    "rtlynx.commands.calibrate",
    "rtlynx.commands.generate",
    "rtlynx.commands.select",
    "rtlynx.commands.demo",
    "rtlynx.commands.bench",
    "rtlynx.commands.build",
]
