"""The FP8 prune kernel divides every kept value by its row's scale with one reciprocal per row and Markstein's
correction (3 multiply-adds) instead of an IEEE division each. tests/native/fp8_division_check.cc proves by brute
force that the e4m3 results equal those of the IEEE quotient (the reference, rtlynx.reference.fp8) for every bf16
(absmax, value) pair the kernel sends down that path; the kernel's own bit-identity tests (tests/gpu) check it on
the device."""
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).parent / "native" / "fp8_division_check.cc"
CXX = shutil.which("g++") or shutil.which("c++")


def _run(tmp_path, *defines):
    exe = tmp_path / "check"
    subprocess.run([CXX, "-O2", "-ffp-contract=off", *defines, str(SRC), "-o", str(exe)], check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    pairs, bad = (int(t) for t in r.stdout.split()[-3::2])
    return r.returncode, pairs, bad, r.stdout


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_markstein_division_matches_ieee_e4m3_for_all_bf16_pairs(tmp_path):
    rc, pairs, bad, out = _run(tmp_path)
    assert pairs > 5e8 and bad == 0 and rc == 0, out


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_the_check_catches_a_plain_product(tmp_path):
    # negative control: without the correction step the casts differ (the check is not vacuous)
    rc, pairs, bad, out = _run(tmp_path, "-DPLAIN_PRODUCT")
    assert bad > 1000 and rc == 1, out
