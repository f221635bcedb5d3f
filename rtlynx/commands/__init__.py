"""CLI subcommands: each module named here has ``register(subparsers)`` adding its subparsers with
``set_defaults(func=...)``. The CLI imports only the module of the command it runs (``rtlynx --help`` imports
none: it shows the help lines below). Modules that fail to import (optional extras missing) are skipped, and
the command tells the user what to install instead of crashing the whole CLI."""

# command -> (module registering it, its one-line help)
COMMANDS = {
    "info": ("rtlynx.commands.info", "versions, GPU and usable backends"),
    "analyze": ("rtlynx.commands.analyze", "per-layer weight vs activation N:M error (CSV + PNG)"),
    "data": ("rtlynx.commands.data", "build data sets"),
    "train-reference": ("rtlynx.commands.train_reference", "train the dense MiniFlux reference model"),
    "calibrate": ("rtlynx.commands.calibrate", "stream dense-trajectory layer statistics for LoRA distillation"),
    "train-lora": ("rtlynx.commands.calibrate", "solve every sparse layer's LoRA from calibration statistics"),
    "generate": ("rtlynx.commands.generate", "generate images with an RT-Lynx pipeline (optionally against dense)"),
    "select": ("rtlynx.commands.select", "choose the sparse layers for speed within a quality budget (preset file)"),
    "demo": ("rtlynx.commands.demo", "dense vs weight 2:4 vs activation 2:4 (+norm, +LoRA) on the shipped model"),
    "bench": ("rtlynx.commands.bench", "benchmark lynx kernels vs cuBLAS / cuSPARSELt (needs an sm_90 GPU)"),
    "build": ("rtlynx.commands.build",
              "compile the lynx sm_90 kernels now (cached; otherwise the first kernel call builds them)"),
}


def help_of(command: str) -> str:
    return COMMANDS[command][1]
