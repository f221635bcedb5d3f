"""Kernel build and load on the CPU with a fake nvcc (a script), a fake CUTLASS tree and a mocked sm_90 GPU:
cache keys, the build lock, temporary files, the library checksum, and the fallback when a build or load fails."""

import stat
import sys
import threading
import warnings

import pytest
import torch

from rtlynx import backends, ops
from rtlynx import reference as R
from rtlynx.cli import main
from rtlynx.commands import build as build_command
from rtlynx.ops import _build, _lib

FAKE_NVCC = r'''#!{python}
import os, sys, time
args = sys.argv[1:]
log = os.environ.get("FAKE_NVCC_LOG")
if log:
    with open(log, "a") as f:
        f.write(("version" if "--version" in args else "link" if "-shared" in args else "compile") + "\n")
if "--version" in args:
    print("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V" +
          os.environ.get("FAKE_NVCC_VERSION", "13.0.88"))
    sys.exit(0)
out = args[args.index("-o") + 1]
time.sleep(float(os.environ.get("FAKE_NVCC_SLEEP", "0")))
if "-c" in args:
    src = args[args.index("-c") + 1]
    with open(out, "w") as f:
        f.write("partial")  # what a compiler killed half way leaves
    if os.environ.get("FAKE_NVCC_FAIL", "\0") in os.path.basename(src):
        sys.stderr.write(src + "(12): error: boom\n")
        sys.exit(2)
    with open(out, "w") as f:
        f.write("object of " + src)
else:
    with open(out, "w") as f:
        f.write("library of " + " ".join(a for a in args if a.endswith(".o")))
'''


def _cutlass(root, version=(4, 2, 0)):
    inc = root / "include"
    (inc / "cutlass" / "util").mkdir(parents=True)
    (inc / "cutlass" / "util" / "packed_stride.hpp").write_text("")
    (inc / "cutlass" / "version.h").write_text(
        "".join(f"#define CUTLASS_{k} {v}\n" for k, v in zip(("MAJOR", "MINOR", "PATCH"), version)))
    return inc


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake toolchain in tmp_path; returns a helper counting nvcc invocations by kind."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(FAKE_NVCC.replace("{python}", sys.executable))
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "nvcc_calls.txt"
    monkeypatch.setenv("RTLYNX_NVCC", str(nvcc))
    monkeypatch.setenv("CUTLASS_INCLUDE", str(_cutlass(tmp_path / "cutlass")))
    monkeypatch.setenv("RTLYNX_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("FAKE_NVCC_LOG", str(log))
    monkeypatch.setenv("MAX_JOBS", "4")
    monkeypatch.delenv("RTLYNX_LIB", raising=False)
    _build.nvcc_version.cache_clear()
    _lib.reset()
    ops._status.cache_clear()

    def calls(kind):
        return log.read_text().split().count(kind) if log.exists() else 0

    yield calls
    _build.nvcc_version.cache_clear()
    _lib.reset()
    ops._status.cache_clear()


@pytest.fixture
def sm90(monkeypatch):
    """Pretend device 0 is an sm_90 GPU (only the capability queries; no tensor goes to CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _leftovers(build_dir):
    return sorted(p.name for p in build_dir.rglob("*") if ".tmp" in p.name)


def test_build_cache_keyed_by_nvcc_cutlass_not_paths(fake, tmp_path, monkeypatch):
    n_units = len(_build.sources())
    lib = _build.build()
    assert fake("compile") == n_units and fake("link") == 1 and _build.verified(lib)
    assert _build.build() == lib and fake("compile") == n_units and fake("link") == 1  # cached
    # CUTLASS moved (same version): objects and library reused, the prebuild-and-carry workflow
    monkeypatch.setenv("CUTLASS_INCLUDE", str(_cutlass(tmp_path / "elsewhere")))
    assert _build.build() == lib and fake("compile") == n_units
    # another CUTLASS version: everything recompiles into a new library
    monkeypatch.setenv("CUTLASS_INCLUDE", str(_cutlass(tmp_path / "cutlass43", (4, 3, 0))))
    lib43 = _build.build()
    assert lib43 != lib and fake("compile") == 2 * n_units
    # another nvcc release: the same
    monkeypatch.setenv("FAKE_NVCC_VERSION", "12.8.93")
    _build.nvcc_version.cache_clear()
    lib128 = _build.build()
    assert lib128 not in (lib, lib43) and fake("compile") == 3 * n_units and fake("link") == 3


def test_prebuilt_objects_link_without_compiling(fake, tmp_path, monkeypatch):
    assert _build.build(link=False) == tmp_path / "build"
    assert fake("compile") == len(_build.sources()) and fake("link") == 0
    lib = _build.build()
    assert fake("compile") == len(_build.sources()) and fake("link") == 1 and _build.verified(lib)


def test_failed_compile_leaves_no_temp_files_and_names_the_log(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_NVCC_FAIL", "prune_compress")
    with pytest.raises(_build.BuildError, match=r"prune_compress_sm90.cu.*error: boom.*build.log") as e:
        _build.build()
    assert e.value.log == tmp_path / "build" / "build.log" and "error: boom" in e.value.log.read_text()
    assert _leftovers(tmp_path / "build") == []
    assert not list((tmp_path / "build").glob("*.so"))


def test_damaged_library_is_relinked_not_loaded(fake, tmp_path):
    lib = _build.build()
    data = bytearray(lib.read_bytes())
    data[3] ^= 0xFF
    lib.write_bytes(bytes(data))
    assert not _build.verified(lib) and _build.cached_library() is None
    assert _build.build() == lib and fake("link") == 2 and _build.verified(lib)


def test_concurrent_builds_compile_once(fake, monkeypatch):
    monkeypatch.setenv("FAKE_NVCC_SLEEP", "0.3")
    results, errors = [], []

    def go():
        try:
            results.append(_build.build())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]  # each opens the lock file: flock serialises them
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert fake("compile") == len(_build.sources()) and fake("link") == 1


def test_lynx_status_runs_nvcc_instead_of_checking_a_path(fake, sm90, tmp_path, monkeypatch):
    broken = tmp_path / "not-nvcc"
    broken.write_text("not a program")  # exists, but cannot run
    monkeypatch.setenv("RTLYNX_NVCC", str(broken))
    ok, why = ops.lynx_status(0)
    assert not ok and "could not run" in why and str(broken) in why
    monkeypatch.setenv("RTLYNX_NVCC", str(tmp_path / "nvcc"))
    ops._status.cache_clear()
    ok, why = ops.lynx_status(0)
    assert ok and "not built yet" in why and "rtlynx build" in why
    lib = _build.build()
    ops._status.cache_clear()
    assert ops.lynx_status(0) == (True, f"sm_90 GPU, kernels built ({lib})")


def _call_lynx(x, w, b):
    return backends.run("lynx", x, w, b, 2, 4, "norm", None, None, 1e-8)


def test_failed_build_falls_back_once_and_is_remembered(fake, sm90, monkeypatch, gen):
    """The first kernel call builds; the build fails: one warning with the cause and the log, the reference
    result, and no rebuild on the next calls."""
    monkeypatch.setenv("FAKE_NVCC_FAIL", "sparse_gemm")
    monkeypatch.setattr(ops, "_check_x", lambda x: ops._check_device(0))  # as for a CUDA x on device 0
    monkeypatch.setattr(backends, "_device_index", lambda x: 0)
    x, w, b = torch.randn(5, 64, generator=gen), torch.randn(16, 64, generator=gen), torch.randn(16, generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = _call_lynx(x, w, b)
        compiles = fake("compile")
        y2 = _call_lynx(x, w, b)
    want = R.sparse_act_linear(x, w, b, 2, 4, "norm")
    assert torch.equal(y, want) and torch.equal(y2, want)
    lynx_warnings = [str(c.message) for c in caught if "'lynx'" in str(c.message)]
    assert len(lynx_warnings) == 1, lynx_warnings
    assert "could not be built" in lynx_warnings[0] and "build.log" in lynx_warnings[0]
    assert fake("compile") == compiles  # not rebuilt
    ok, why = ops.lynx_status(0)
    assert not ok and "build.log" in why


@pytest.mark.parametrize("what", ["missing-nvcc", "bad-lib"])
def test_load_failure_is_an_unsupported_and_remembered(fake, sm90, tmp_path, monkeypatch, what):
    if what == "missing-nvcc":
        monkeypatch.setenv("RTLYNX_NVCC", "/nonexistent/nvcc")
        cause = "/nonexistent/nvcc"
    else:
        bad = tmp_path / "librtlynx_sm90.so"
        bad.write_bytes(b"\x7fELF but not really a library")
        monkeypatch.setenv("RTLYNX_LIB", str(bad))
        cause = f"RTLYNX_LIB={bad}"
    with pytest.raises(ops.LibraryUnavailable, match=cause):
        _lib.lib()
    assert issubclass(ops.LibraryUnavailable, ops.Unsupported)  # what the backends and sites fall back on
    n = fake("version")
    with pytest.raises(ops.LibraryUnavailable, match=cause):
        ops._check_device(0)
    assert fake("version") == n
    ok, why = ops.lynx_status(0)
    assert not ok and cause in why


def test_build_cli(fake, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--jobs" in out and "(default: 4)" in out and "--no-link" in out and str(tmp_path / "build") in out.replace(" ", "")
    assert main(["build", "--no-link", "-j", "2"]) == 0
    assert "V13.0.88" in capsys.readouterr().out and fake("link") == 0
    assert build_command.main(["--jobs", "2"]) == 0  # python -m rtlynx.ops._build: the same command (links here)
    assert fake("compile") == len(_build.sources()) and fake("link") == 1
    monkeypatch.setenv("FAKE_NVCC_FAIL", "sparse_gemm_sm90_dispatch")
    _build.nvcc_version.cache_clear()
    monkeypatch.setenv("FAKE_NVCC_VERSION", "13.0.89")  # new keys: compiles again, and fails
    with pytest.raises(SystemExit, match=r"rtlynx build: nvcc failed on sparse_gemm_sm90_dispatch.cu.*build.log"):
        main(["build"])


def test_first_kernel_build_says_so(fake, capsys):
    _build.build(progress=True)
    err = capsys.readouterr().err
    assert "compiling the lynx kernels" in err and "rtlynx build" in err
    _build.build(progress=True)
    assert capsys.readouterr().err == ""  # cached: silent
