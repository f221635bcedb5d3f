"""Build the sm90 kernels (csrc/*.cu) into one shared library with nvcc, cached.

No torch headers are involved: the library has a plain C ABI (csrc/rtlynx_sm90.h) and is loaded with ctypes,
so one build serves any torch version. Every .cu is its own translation unit, compiled in parallel.

Cache keys (what decides whether a cached file is reused):

- object ``obj/<unit>.<key>.o``: the unit's source, the csrc headers, the nvcc flags (they fix the target,
  ``sm_90a``), the nvcc release (``nvcc --version``, e.g. ``V13.0.88``) and the CUTLASS version
  (``cutlass/version.h``). Not the include paths, the GPU or its driver: objects compiled on one machine are
  reused on another with the same nvcc release, CUTLASS version and sources, wherever CUTLASS sits there.
- library ``librtlynx_sm90.<key>.so``: its objects, the link flags and the nvcc release. Next to it,
  ``librtlynx_sm90.<key>.json`` records the library's sha256; a library whose bytes do not match is relinked,
  never loaded (the check guards against damaged or half-written files, not against someone who can write
  the folder).

Prebuilding on a machine without a GPU (only nvcc and the CUTLASS headers are needed) and linking elsewhere::

    RTLYNX_BUILD_DIR=/some/dir CUTLASS_INCLUDE=/path/to/cutlass/include rtlynx build --no-link
    # (or: python -m rtlynx.ops._build --no-link); carry /some/dir/obj to the GPU machine, then there
    RTLYNX_BUILD_DIR=/some/dir rtlynx build     # or just run: the first kernel call links (seconds)

The GPU machine needs the same nvcc release and CUTLASS version, else its keys differ and it compiles anew.

Concurrency: a build holds an exclusive lock on ``<build dir>/.lock`` (fcntl), so processes starting together
(ranks of one job) compile once; the others wait and then find the files cached. A failed compile leaves no
temporary file. Each build writes its nvcc commands and output to ``<build dir>/build.log``.

Environment:
- ``RTLYNX_BUILD_DIR``: cache folder (default ``~/.cache/rtlynx/sm90``).
- ``CUTLASS_INCLUDE``: CUTLASS include dir (with ``cutlass/util``); default: the ``nvidia-cutlass`` package, or
  ``.cache/cutlass/include`` in the source checkout.
- ``RTLYNX_NVCC``: nvcc path (default: ``$CUDA_HOME/bin/nvcc`` or ``nvcc`` on PATH).
- ``MAX_JOBS``: parallel compiles (default: CPU count).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .._files import file_sha256
from ._configs import CSRC

LIB_NAME = "librtlynx_sm90.so"
ARCH = "sm_90a"
NVCC_FLAGS = [
    "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
    "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-DCUTLASS_ENABLE_GDC_FOR_SM90",
]


class BuildError(RuntimeError):
    """The kernels could not be built; ``log`` is the build log file (None when nothing was run)."""

    def __init__(self, message: str, log: Path | None = None):
        super().__init__(message)
        self.log = log


def find_nvcc() -> str | None:
    cand = os.environ.get("RTLYNX_NVCC")
    if cand:
        return cand
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda/bin/nvcc"
    return None


def find_cutlass_include() -> str | None:
    env = os.environ.get("CUTLASS_INCLUDE")
    if env:
        return env
    local = CSRC.parent / ".cache" / "cutlass" / "include"
    if (local / "cutlass" / "util" / "packed_stride.hpp").exists():
        return str(local)
    try:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")
        if spec and spec.origin:
            src = Path(spec.origin).parent / "source"
            if (src / "include" / "cutlass").exists():
                return str(src / "include")
    except Exception:  # noqa: BLE001 - best effort lookup
        pass
    return None


def _util_include(cutlass_inc: str) -> list[str]:
    """cutlass/util lives in tools/util/include in the wheel; add it when it is not merged in."""
    p = Path(cutlass_inc)
    if (p / "cutlass" / "util" / "packed_stride.hpp").exists():
        return []
    tools = p.parent / "tools" / "util" / "include"
    return [f"-I{tools}"] if tools.exists() else []


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def _headers_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(list(CSRC.glob("*.h")) + list(CSRC.glob("*.cuh"))):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def build_dir() -> Path:
    return Path(os.environ.get("RTLYNX_BUILD_DIR", Path.home() / ".cache" / "rtlynx" / "sm90"))


def default_jobs() -> int:
    return int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))


@functools.lru_cache(maxsize=8)
def nvcc_version(nvcc: str) -> str:
    """The nvcc release (``V13.0.88``), by running ``nvcc --version``: proves the compiler runs, and keys the cache."""
    try:
        r = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"nvcc {nvcc!r} could not run ({type(e).__name__}: {e})") from e
    if r.returncode != 0:
        raise BuildError(f"nvcc {nvcc!r} --version failed (exit {r.returncode}): {(r.stderr or r.stdout)[-300:].strip()}")
    m = re.search(r"\bV(\d+\.\d+\.\d+)", r.stdout)
    if m is None:
        raise BuildError(f"nvcc {nvcc!r} --version printed no release number: {r.stdout[-300:].strip()!r}")
    return "V" + m.group(1)


def cutlass_version(inc: str) -> str:
    """``major.minor.patch`` from ``cutlass/version.h``."""
    f = Path(inc) / "cutlass" / "version.h"
    try:
        text = f.read_text()
    except OSError as e:
        raise BuildError(f"CUTLASS include dir {inc!r} has no readable cutlass/version.h ({e})") from e
    parts = [re.search(rf"#define\s+CUTLASS_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise BuildError(f"{f} does not define CUTLASS_MAJOR/MINOR/PATCH")
    return ".".join(p.group(1) for p in parts)


def toolchain() -> dict:
    """nvcc (path, release), CUTLASS (include dir, version) and the target: what the cache is keyed by (not the
    paths). Raises :class:`BuildError` when nvcc does not run or CUTLASS is missing."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (set CUDA_HOME or RTLYNX_NVCC)")
    inc = find_cutlass_include()
    if inc is None:
        raise BuildError("CUTLASS headers not found: pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_INCLUDE")
    return {"nvcc": nvcc, "nvcc_version": nvcc_version(nvcc), "cutlass_include": inc,
            "cutlass_version": cutlass_version(inc), "arch": ARCH}


def _key(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _object_path(out: Path, src: Path, hdr: str, tc: dict) -> Path:
    src_digest = hashlib.sha256(src.read_bytes()).hexdigest()
    # include paths are not hashed (same headers, other place: objects travel between machines)
    key = _key(src_digest, hdr, " ".join(NVCC_FLAGS), tc["nvcc_version"], tc["cutlass_version"], tc["arch"])
    return out / "obj" / f"{src.stem}.{key}.o"


LINK_FLAGS = ["-shared", "-gencode=arch=compute_90a,code=sm_90a", "-cudart", "static"]


def _library_path(out: Path, objs: list[Path], tc: dict) -> Path:
    return out / f"librtlynx_sm90.{_key(*sorted(o.name for o in objs), ' '.join(LINK_FLAGS), tc['nvcc_version'])}.so"


def _manifest(lib: Path) -> Path:
    return lib.with_suffix(".json")


def verified(lib: Path) -> bool:
    """Whether ``lib`` exists and its bytes match the sha256 its manifest recorded at link time."""
    try:
        want = json.loads(_manifest(lib).read_text())["sha256"]
        return lib.is_file() and file_sha256(lib) == want
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached_library(tc: dict | None = None) -> Path | None:
    """The verified cached library for this toolchain and these sources, or None (nothing is built)."""
    tc = tc or toolchain()
    out = build_dir()
    hdr = _headers_digest()
    lib = _library_path(out, [_object_path(out, s, hdr, tc) for s in sources()], tc)
    return lib if verified(lib) else None


@contextlib.contextmanager
def _build_lock(out: Path, say):
    """Exclusive lock on ``out/.lock`` for the whole build (other processes wait, then reuse what it built)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"rtlynx: another process is building the kernels in {out}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_logged(cmd: list[str], log, what: str) -> subprocess.CompletedProcess:
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # nvcc vanished or is not executable
        log.write(f"$ {' '.join(cmd)}\n{type(e).__name__}: {e}\n")
        raise BuildError(f"{what}: could not run {cmd[0]!r} ({type(e).__name__}: {e})") from e
    log.write(f"$ {' '.join(cmd)}\n[exit {r.returncode}, {time.time() - t0:.1f} s]\n{r.stdout}{r.stderr}\n")
    log.flush()
    return r


def build(verbose: bool = False, only: list[str] | None = None, link: bool = True, jobs: int | None = None,
          progress: bool = False) -> Path:
    """Compile (cached) and link; returns the library path (or the build dir when ``link`` is False).

    ``only``: subset of .cu stems (no link). ``jobs``: parallel compiles (default ``MAX_JOBS`` or the CPU count).
    ``progress``: say on stderr that a build is starting and show a progress bar (the first kernel call does).
    Raises :class:`BuildError` (with the log file) on any failure."""
    tc = toolchain()
    out = build_dir()
    try:
        (out / "obj").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create the build dir {out} ({e}); set RTLYNX_BUILD_DIR") from e
    flags = NVCC_FLAGS + [f"-I{tc['cutlass_include']}", *_util_include(tc["cutlass_include"]), f"-I{CSRC}"]
    hdr = _headers_digest()
    srcs = [s for s in sources() if only is None or s.stem in only]
    # Biggest (GEMM) units first so the slow ones start early.
    srcs.sort(key=lambda s: (not s.stem.startswith(("sparse_gemm_sm90_t", "sparse_gemm_fp8_sm90_f8")), s.name))
    objs = {s: _object_path(out, s, hdr, tc) for s in srcs}
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if (progress or verbose) else (lambda msg: None)
    with _build_lock(out, say):
        todo = [s for s in srcs if not objs[s].exists()]
        lib = _library_path(out, list(objs.values()), tc) if link and only is None else None
        if not todo and (lib is None or verified(lib)):
            return lib or out
        log_path = out / "build.log"
        with open(log_path, "w") as log:
            log.write(f"rtlynx build {time.strftime('%Y-%m-%d %H:%M:%S')}: {json.dumps(tc)}\n")
            if todo:
                _compile(todo, objs, flags, tc["nvcc"], jobs or default_jobs(), log, log_path, say, verbose,
                         progress)
            if lib is not None:
                _link(lib, list(objs.values()), tc, log, log_path, say)
        return lib or out


def _compile(todo, objs, flags, nvcc, jobs, log, log_path, say, verbose, progress) -> None:
    jobs = max(1, jobs)
    say(f"rtlynx: compiling the lynx kernels ({len(todo)} units, {jobs} parallel; about 1.5 min with 16 cores, "
        f"once per toolchain; `rtlynx build` does it ahead of time) into {log_path.parent}")

    def compile_one(src: Path) -> Path:
        obj = objs[src]
        tmp = obj.with_suffix(f".tmp{os.getpid()}.{id(src)}.o")
        try:
            r = _run_logged([nvcc, *flags, "-c", str(src), "-o", str(tmp)], log, f"compiling {src.name}")
            if r.returncode != 0:
                raise BuildError(f"nvcc failed on {src.name}: {_last_error(r.stderr)} (full log: {log_path})",
                                 log_path)
            os.replace(tmp, obj)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if verbose:
            say(f"[rtlynx build] {src.name} ok")
        return obj

    bar = None
    if progress and not verbose:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="rtlynx kernels", unit="unit", file=sys.stderr)
    ex = cf.ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [ex.submit(compile_one, s) for s in todo]
        for f in cf.as_completed(futures):
            f.result()  # the first failure stops the build (queued units are cancelled below)
            if bar is not None:
                bar.update(1)
    except BaseException as e:
        ex.shutdown(wait=True, cancel_futures=True)
        if isinstance(e, BuildError):
            raise
        if isinstance(e, Exception):
            raise BuildError(f"build failed ({type(e).__name__}: {e}; log: {log_path})", log_path) from e
        raise
    finally:
        ex.shutdown(wait=True)
        if bar is not None:
            bar.close()


def _link(lib: Path, objs: list[Path], tc: dict, log, log_path: Path, say) -> None:
    if lib.exists() or _manifest(lib).exists():
        say(f"rtlynx: cached library {lib.name} failed its checksum; relinking")
        log.write(f"{lib} failed its checksum: relinking\n")
    tmp = lib.with_suffix(f".tmp{os.getpid()}.so")
    tmp_manifest = _manifest(lib).with_suffix(f".tmp{os.getpid()}.json")
    try:
        r = _run_logged([tc["nvcc"], *LINK_FLAGS, *map(str, objs), "-o", str(tmp)], log, "linking")
        if r.returncode != 0:
            raise BuildError(f"link failed: {_last_error(r.stderr)} (full log: {log_path})", log_path)
        tmp_manifest.write_text(json.dumps({"sha256": file_sha256(tmp), "objects": [o.name for o in objs],
                                            **{k: tc[k] for k in ("nvcc_version", "cutlass_version", "arch")}},
                                           indent=1))
        os.replace(tmp, lib)  # the library first: a crash before the manifest means "relink", never a bad load
        os.replace(tmp_manifest, _manifest(lib))
    finally:
        for t in (tmp, tmp_manifest):
            with contextlib.suppress(FileNotFoundError):
                t.unlink()


def _last_error(stderr: str) -> str:
    """The first line naming an error (nvcc prints pages of notes), else the last line."""
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower():
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


if __name__ == "__main__":  # python -m rtlynx.ops._build: the `rtlynx build` command (a script, above the layers)
    from rtlynx.commands.build import main

    sys.exit(main())
