"""The shared benchmark helpers (rtlynx.benchtools): timing on the CPU path, run identity, and that every
benchmark script uses them."""

import hashlib
import re
import subprocess
import time
from pathlib import Path

import pytest

from rtlynx import benchtools

ROOT = Path(__file__).resolve().parents[1]
BENCH = sorted((ROOT / "benchmarks").glob("*.py"))


def test_measure_median_of_sleeps():
    # closed form: a callable that sleeps d ms takes at least d ms; the median ignores one slow outlier rep
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.2 if len(calls) == 4 else 0.005)

    t = benchtools.measure(fn, reps=9, warmup=2, cuda=False)
    assert len(calls) == 11 and t.reps == 9 and t.input_sets == 1
    assert 5.0 <= t.median_ms < 100.0 and t.max_ms >= 200.0


def test_measure_rotates_input_sets_in_turn():
    order = []
    fns = [lambda i=i: order.append(i) for i in range(3)]
    benchtools.measure(fns, reps=7, warmup=2, cuda=False)
    assert order == [0, 1] + [0, 1, 2, 0, 1, 2, 0]


def test_input_sets_exceed_the_rotation_bytes():
    assert benchtools.input_sets(10_000_000, min_total=150_000_000) == 15  # ceil(150 / 10)
    assert benchtools.input_sets(10**9, min_total=150_000_000) == 2        # always at least two
    assert benchtools.input_sets(1, min_total=150_000_000) == 16           # capped
    made = benchtools.rotating(lambda: (lambda: None), 50_000_000, min_total=150_000_000)
    assert len(made) == 3


def test_graph_timing_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        benchtools.measure(lambda: None, graph=True, cuda=False)


def test_git_commit_names_head_of_this_checkout(monkeypatch):
    monkeypatch.delenv("RTLYNX_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    commit = benchtools.git_commit()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip())
    assert re.fullmatch(r"(.+-g)?[0-9a-f]{7,}(-dirty)?", commit), commit
    assert head.startswith(commit.removesuffix("-dirty").rsplit("-g", 1)[-1])
    assert commit.endswith("-dirty") == dirty


def test_git_commit_from_the_environment(monkeypatch):
    """A device copy of the tree carries a stale .git: the caller names the commit it copied."""
    monkeypatch.setenv("RTLYNX_COMMIT", "abc1234")
    assert benchtools.git_commit() == "abc1234"
    assert benchtools.run_metadata()["commit"] == "abc1234"


def test_git_commit_of_another_repository_is_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("RTLYNX_COMMIT", raising=False)
    if subprocess.run(["git", "init", "-q", str(tmp_path)]).returncode != 0:
        pytest.skip("no git")
    assert benchtools.git_commit(tmp_path) == "unknown"  # a repository that does not hold rtlynx


def test_kernel_library_hash(tmp_path, monkeypatch):
    from rtlynx.ops import _lib

    lib = tmp_path / "librtlynx_sm90.abc.so"
    lib.write_bytes(b"\x7fELF not really a library" * 1000)
    monkeypatch.setattr(_lib, "_LIB", None)
    monkeypatch.setenv("RTLYNX_LIB", str(lib))
    info = benchtools.kernel_library()
    assert info == {"name": lib.name, "path": str(lib), "sha256": hashlib.sha256(lib.read_bytes()).hexdigest()}
    monkeypatch.delenv("RTLYNX_LIB")
    assert benchtools.kernel_library() is None
    meta = benchtools.run_metadata()
    assert {"commit", "source_digest", "kernel_library", "torch", "device"} <= set(meta)


@pytest.mark.parametrize("script", [p for p in BENCH if re.search(r"json\.dump|write_text\(json", p.read_text())],
                         ids=lambda p: p.name)
def test_every_results_writer_records_the_run(script):
    assert "run_metadata()" in script.read_text(), f"{script.name} writes results without benchtools.run_metadata"


@pytest.mark.parametrize("script", BENCH, ids=lambda p: p.name)
def test_no_private_timing_loops(script):
    """All GPU timing goes through rtlynx.benchtools (one routine: median, warm-up, rotation, graphs)."""
    src = script.read_text()
    if script.name == "sustained.py":  # its own measurement: one event pair around seconds of back-to-back calls
        src = src.replace("def sustained(", "").split("def main(")[1]
    for pattern in ("Event(enable_timing", "do_bench", "CUDAGraph()"):
        assert pattern not in src, f"{script.name} times with its own {pattern}"


def test_geomean_closed_form_and_missing_values():
    assert benchtools.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert benchtools.geomean([0.5, 2.0, 1.0]) == pytest.approx(1.0)
    # variants that did not run (None), failed (0, NaN) or make no sense (negative) are left out
    assert benchtools.geomean([None, 3.0, 0, float("nan"), -1.0, 12.0]) == pytest.approx(6.0)
    assert benchtools.geomean([]) is None and benchtools.geomean([None, 0.0, float("nan")]) is None
    assert benchtools.fmt(None) == "n/a" and benchtools.fmt(1.23456) == "1.235"
    assert f"{benchtools.fmt(None):>6}|" == "   n/a|"


@pytest.mark.parametrize("script", BENCH, ids=lambda p: p.name)
def test_no_private_geomean(script):
    """Every summary ratio goes through benchtools.geomean (one rule for missing values: None, JSON null)."""
    assert "def geomean(" not in script.read_text(), f"{script.name} has its own geomean"


def test_source_digest_covers_python_and_cuda_sources(tmp_path):
    pkg = tmp_path / "rtlynx"
    (pkg / "csrc").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "csrc" / "k.cu").write_text("// kernel\n")
    d0 = benchtools.source_digest(tmp_path)
    (pkg / "csrc" / "k.cu").write_text("// kernel v2\n")
    d1 = benchtools.source_digest(tmp_path)
    (pkg / "a.py").write_text("x = 2\n")
    assert len({d0, d1, benchtools.source_digest(tmp_path)}) == 3
