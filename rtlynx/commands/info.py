"""`rtlynx info`: versions, GPU, and which backends can run here."""

from __future__ import annotations

from . import help_of


def info_dict() -> dict:
    import platform

    import torch

    from .. import backends
    from .._version import __version__

    d = {"rtlynx": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "cuda_available": torch.cuda.is_available(), "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    try:
        import diffusers

        d["diffusers"] = diffusers.__version__
    except ImportError:
        d["diffusers"] = None
    d["backends"] = {"reference": (True, "pure torch, any device"),
                     "cusparselt": backends.cusparselt_status(), "lynx": backends.lynx_status()}
    return d


def run(args) -> int:
    d = info_dict()
    for k in ("rtlynx", "python", "torch", "diffusers", "cuda_available", "gpu"):
        print(f"{k:15s} {d[k]}")
    print("backends:")
    for name, (ok, why) in d["backends"].items():
        print(f"  {name:12s} {'yes' if ok else 'no ':3s}  {why}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help=help_of("info"))
    p.set_defaults(func=run)
