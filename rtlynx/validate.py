"""One place that checks numbers from users and files: config fields, CLI flags, statistics, LoRA tensors.

Every check raises ValueError with one line that names the value and says what is allowed. Standard library and
torch only (torch imported lazily), so the config, the file readers and the CLI (whose --help must stay fast) can
all use it.
"""

from __future__ import annotations

import argparse
import math


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a rank


def is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(name: str, v, low: int | None = None, high: int | None = None) -> int:
    """``v`` is an int in [low, high] (either bound may be open)."""
    if not is_int(v) or (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be an integer {_range(low, high)}, got {v!r}")
    return v


def real(name: str, v, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False) -> float:
    """``v`` is a finite number in the range (open or closed at each end)."""
    ok = is_real(v) and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number {_range(low, high, low_open, high_open)}, got {v!r}")
    return v


def _range(low, high, low_open=False, high_open=False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "(any)"


def finite_in_dtype(name: str, t, dtype) -> None:
    """``t`` is finite, and stays finite once cast to ``dtype`` (a float16 model cannot hold 1e5)."""
    import torch

    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or Inf values")
    if dtype is not None and dtype.is_floating_point and t.numel():
        big = float(t.detach().abs().max())
        limit = torch.finfo(dtype).max
        if big > limit:
            raise ValueError(f"{name} holds {big:.3g}, beyond the largest {str(dtype).removeprefix('torch.')} "
                             f"({limit:.3g}) of the model it is loaded into")


def device(name: str, spec: str) -> str | None:
    """'auto' -> None; otherwise a device torch understands that exists here ('cpu', 'cuda', 'cuda:N')."""
    if spec == "auto":
        return None
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {spec}: no CUDA GPU is visible here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ValueError(f"{name} {spec!r}: rtlynx runs on cpu or cuda")
    return spec


# ------------------------------------------------------------------------------------------- argparse types
def arg_int(low: int | None = None, high: int | None = None):
    """An argparse ``type`` for an integer in [low, high]."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {_range(low, high)}, got {s!r}") from None
        try:
            return integer("value", v, low, high)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {_range(low, high)}, got {s}") from None
    parse.__name__ = "integer"
    return parse


def arg_rank_or_fill(low: int = 1):
    """An argparse ``type`` for a LoRA rank: an integer >= ``low``, or "fill" (each site at what rank 8 costs)."""
    def parse(s: str) -> int | str:
        if s == "fill":
            return s
        try:
            return arg_int(low)(s)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low} or 'fill', got {s!r}") from None
    parse.__name__ = "rank"
    return parse


def arg_real(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse ``type`` for a finite number in the range."""
    def parse(s: str) -> float:
        msg = f"must be a finite number {_range(low, high, low_open, high_open)}, got {s!r}"
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(msg) from None
        try:
            return real("value", v, low, high, low_open, high_open)
        except ValueError:
            raise argparse.ArgumentTypeError(msg) from None
    parse.__name__ = "number"
    return parse


def arg_t(s: str):
    """--dense-below-t: a noise level in (0, 1], "none" (sparse at every step) or "config" (the saved value)."""
    if s in ("none", "config"):
        return s
    try:
        return real("t", float(s), 0.0, 1.0, low_open=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], 'none' or 'config', got {s!r}") from None
