"""What every benchmark shares: one timing routine and the identity of the code that ran.

``measure`` is the only GPU timing code of the benchmarks (benchmarks/*.py): the median of many reps after warm-up,
each rep on the next of several input sets (rotated so their bytes exceed L2: every rep reads cold operands, as a
layer does inside a model) or, with one callable, after reading a buffer larger than L2 (a read leaves no dirty
lines for the timed kernel to write back, unlike triton's memset flush); optionally every call captured in a CUDA
graph (GPU time without host overhead). On a CPU it times wall clock, so the scripts' smoke runs work there.

``geomean`` is the one summary of per-shape ratios (None, JSON null, when nothing ran); ``fmt`` prints it.

``run_metadata`` is what every results JSON records: ``git describe --dirty`` of the checkout, a digest of the
sources, and the name and sha256 of the kernel library that was loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._files import file_sha256
from ._version import __version__
from .config import BENCH_FLUSH_BYTES, BENCH_ROTATE_BYTES
from .ops import _lib

ROOT = Path(__file__).resolve().parents[1]  # the checkout root when rtlynx is installed editable


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    input_sets: int
    graph: bool

    def asdict(self) -> dict:
        return asdict(self)


def input_sets(nbytes_per_set: int, min_total: int = BENCH_ROTATE_BYTES, max_sets: int = 16) -> int:
    """How many input sets of ``nbytes_per_set`` bytes rotate beyond L2 (at least 2, at most ``max_sets``)."""
    return max(2, min(max_sets, -(-min_total // max(1, nbytes_per_set))))


def rotating(make_fn: Callable[[], Callable], nbytes_per_set: int, **kw) -> list[Callable]:
    """``make_fn()`` called once per input set (each call allocates its own inputs and returns the timed callable)."""
    return [make_fn() for _ in range(input_sets(nbytes_per_set, **kw))]


def capture(fn: Callable, warmup: int = 2) -> Callable:
    """``fn`` captured in a CUDA graph after warm-up on a side stream; returns the graph's replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    def replay():
        g.replay()

    replay.graph = g  # the graph (and its memory pool) lives as long as the callable
    return replay


_FLUSH: dict = {}


def _flush_l2() -> None:
    buf = _FLUSH.get("buf")
    if buf is None:
        buf = _FLUSH["buf"] = torch.ones(BENCH_FLUSH_BYTES // 4, device="cuda")
    _FLUSH["sink"] = buf.sum()  # a read: evicts L2 without leaving dirty lines behind


def measure(fns: Callable | Sequence[Callable], reps: int = 100, warmup: int = 10, graph: bool = False,
            flush_l2: bool | None = None, sync_each: bool = False, cuda: bool | None = None) -> Timing:
    """Median time (ms) of one call. ``fns``: one callable, or one per input set (see ``rotating``), called in turn.
    ``graph``: each callable is captured in a CUDA graph and replayed. ``flush_l2`` (default: when a single callable
    is given on the GPU): read a buffer larger than L2 before each rep, outside the timed interval. ``sync_each``:
    wait for the GPU after every rep, so each starts with an empty queue and host time counts (eager forwards,
    where the host can be the limit). ``cuda``: time
    with CUDA events (default: when CUDA is available), else wall clock."""
    fns = [fns] if callable(fns) else list(fns)
    if not fns:
        raise ValueError("measure: nothing to time")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if graph and not cuda:
        raise RuntimeError("measure(graph=True) needs a CUDA GPU")
    flush_l2 = (cuda and len(fns) == 1) if flush_l2 is None else flush_l2
    calls = [capture(f) for f in fns] if graph else fns
    for i in range(warmup):
        calls[i % len(calls)]()
    times = []
    if cuda:
        torch.cuda.synchronize()
        events = []
        for i in range(reps):
            if flush_l2:
                _flush_l2()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            calls[i % len(calls)]()
            b.record()
            events.append((a, b))
            if sync_each:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in events]
    else:
        for i in range(reps):
            t = time.perf_counter()
            calls[i % len(calls)]()
            times.append(1e3 * (time.perf_counter() - t))
    return Timing(statistics.median(times), min(times), max(times), reps, len(fns), graph)


def median_ms(fns, **kw) -> float:
    return measure(fns, **kw).median_ms


# ---------------------------------------------------------------------------------------------- run identity

def geomean(values) -> float | None:
    """Geometric mean of the positive numbers in ``values``; None, zero, negative and NaN entries (a variant that
    did not run, or failed) are left out. None when nothing is left: JSON null (NaN is not valid JSON)."""
    v = [x for x in values if x is not None and x > 0]  # NaN > 0 is False
    return math.exp(math.fsum(math.log(x) for x in v) / len(v)) if v else None


def fmt(x: float | None, spec: str = ".3f") -> str:
    """``format(x, spec)``, or "n/a" for a missing value (a geomean of nothing)."""
    return "n/a" if x is None else format(x, spec)


def git_commit(cwd: Path | None = None) -> str:
    """``git describe --always --dirty`` of the checkout rtlynx runs from; "unknown" outside one (a wheel install,
    a copy without .git). Only a repository whose top level holds this rtlynx package counts, so a wheel inside
    some other repository's virtual environment does not report that repository's commit."""
    if os.environ.get("RTLYNX_COMMIT"):  # the commit a caller copied to a machine whose copied .git is stale
        return os.environ["RTLYNX_COMMIT"]
    cwd = Path(cwd or ROOT)
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, cwd=cwd,
                             timeout=30).stdout.strip()
        if not top or not (Path(top) / "rtlynx" / "__init__.py").is_file():
            return "unknown"
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                             text=True, cwd=cwd, timeout=30).stdout.strip()
        return out or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_digest(root: Path | None = None) -> str:
    """sha256 (16 hex) of the rtlynx package's Python and CUDA sources: names the code that ran even where the
    checkout's .git is stale or missing."""
    pkg = Path(root or ROOT) / "rtlynx"
    h = hashlib.sha256()
    csrc = pkg / "csrc"  # a symlink in a checkout, which rglob does not follow
    files = [*pkg.rglob("*.py"), *(p for p in csrc.glob("*") if p.suffix in (".cu", ".cuh", ".h"))]
    for p in sorted(files):
        h.update(p.relative_to(pkg).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def kernel_library() -> dict | None:
    """Name, path and sha256 of the lynx kernel library this process loaded (else the one RTLYNX_LIB names);
    None when no library was loaded or named."""
    path = None
    try:
        if _lib._LIB is not None:
            path = _lib._LIB._name
    except Exception:  # noqa: BLE001  (a broken kernel module must not lose the results)
        pass
    path = path or os.environ.get("RTLYNX_LIB")
    if not path:
        return None
    p = Path(path)
    return {"name": p.name, "path": str(p), "sha256": file_sha256(p) if p.is_file() else None}


def add_row(out: dict, row: dict, path, t0: float, line: str) -> None:
    """A probe's row: appended to ``out["rows"]``, printed as ``line``, and the whole file written again with the
    seconds so far (row by row: a stopped run keeps what it measured)."""
    out["rows"].append(row)
    print(line, flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    Path(path).write_text(json.dumps(out, indent=1))


def run_metadata() -> dict:
    """The identity of a run, for every results JSON: commit, source digest, kernel library, versions, device."""
    return {"commit": git_commit(), "source_digest": source_digest(), "kernel_library": kernel_library(),
            "rtlynx": __version__, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
