"""tests/conftest.py: every test is seeded, and a failing test's report says how to rerun it with the same numbers."""

import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def test_seed_fixture_seeds_torch_numpy_and_random(seed):
    assert torch.initial_seed() == seed
    assert np.random.get_state()[1][0] == seed  # MT19937 key after np.random.seed(seed)
    assert random.random() == random.Random(seed).random()


def test_failure_report_names_the_seed(tmp_path):
    (tmp_path / "test_fails.py").write_text(
        "import torch\n"
        "def test_fails():\n"
        "    assert torch.rand(1).item() < 0\n")
    env = {**os.environ, "RTLYNX_TEST_SEED": "12345", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                        str(tmp_path / "test_fails.py")], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    child_seed = (12345 + zlib.crc32(b"test_fails.py::test_fails")) % 2**31  # session seed + crc32 of the test id
    assert f"this test ran with seed {child_seed}" in r.stdout, r.stdout
    assert "RTLYNX_TEST_SEED=12345 python -m pytest 'test_fails.py::test_fails'" in r.stdout
