"""Build the sm90 kernels (csrc/*.cu) into one shared library with nvcc, cached.

No torch headers are involved: the library has a plain C ABI (csrc/rtlynx_sm90.h) and is loaded with ctypes,
so one build serves any torch version. Every .cu is its own translation unit, compiled in parallel; objects are
cached by a hash of (source, headers, flags), the library by the hash of its objects.

Environment:
- ``RTLYNX_BUILD_DIR``: cache folder (default ``~/.cache/rtlynx/sm90``).
- ``CUTLASS_INCLUDE``: CUTLASS include dir (with ``cutlass/util``); default: the ``nvidia-cutlass`` package, or
  ``.cache/cutlass/include`` in the source checkout.
- ``RTLYNX_NVCC``: nvcc path (default: ``$CUDA_HOME/bin/nvcc`` or ``nvcc`` on PATH).
- ``MAX_JOBS``: parallel compiles (default: CPU count).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

# In a source checkout csrc/ sits at the repository root; wheels carry it as rtlynx/csrc (a symlink
# to ../csrc in the checkout, whose files setuptools copies into the package).
CSRC = Path(__file__).resolve().parents[1] / "csrc"
if not CSRC.is_dir():
    CSRC = Path(__file__).resolve().parents[2] / "csrc"
LIB_NAME = "librtlynx_sm90.so"
NVCC_FLAGS = [
    "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
    "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-DCUTLASS_ENABLE_GDC_FOR_SM90",
]


class BuildError(RuntimeError):
    pass


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


def build(verbose: bool = False, only: list[str] | None = None, link: bool = True) -> Path:
    """Compile (cached) and link; returns the library path. ``only``: subset of .cu stems (no link)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (set CUDA_HOME or RTLYNX_NVCC)")
    inc = find_cutlass_include()
    if inc is None:
        raise BuildError("CUTLASS headers not found: pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_INCLUDE")
    out = build_dir()
    (out / "obj").mkdir(parents=True, exist_ok=True)
    flags = NVCC_FLAGS + [f"-I{inc}", *_util_include(inc), f"-I{CSRC}"]
    hdr = _headers_digest()
    srcs = [s for s in sources() if only is None or s.stem in only]

    def obj_for(src: Path) -> Path:
        h = hashlib.sha256()
        h.update(src.read_bytes())
        h.update(hdr.encode())
        h.update(" ".join(NVCC_FLAGS).encode())  # include paths are not hashed (same headers, other place)
        return out / "obj" / f"{src.stem}.{h.hexdigest()[:16]}.o"

    def compile_one(src: Path) -> Path:
        obj = obj_for(src)
        if obj.exists():
            return obj
        tmp = obj.with_suffix(f".tmp{os.getpid()}.o")
        cmd = [nvcc, *flags, "-c", str(src), "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"nvcc failed on {src.name}:\n{r.stderr[-6000:]}")
        if verbose:
            print(f"[rtlynx build] {src.name} ok", flush=True)
        os.replace(tmp, obj)
        return obj

    jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    # Biggest (GEMM) units first so the slow ones start early.
    srcs.sort(key=lambda s: (not s.stem.startswith(("sparse_gemm_sm90_t", "sparse_gemm_fp8_sm90_f8")), s.name))
    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        objs = list(ex.map(compile_one, srcs))
    if not link:
        return out
    digest = hashlib.sha256("".join(sorted(o.name for o in objs)).encode()).hexdigest()[:16]
    lib = out / f"librtlynx_sm90.{digest}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".tmp{os.getpid()}.so")
        cmd = [nvcc, "-shared", "-gencode=arch=compute_90a,code=sm_90a", "-cudart", "static",
               *map(str, objs), "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"link failed:\n{r.stderr[-6000:]}")
        os.replace(tmp, lib)
    return lib


if __name__ == "__main__":  # python -m rtlynx.ops._build
    import sys

    print(build(verbose=True, link="--no-link" not in sys.argv))
