"""tests/gpu/sanitize_small.py runs GPU tests' bodies by hand under compute-sanitizer; a test whose signature
changed made that run fail on the device (2026-12-07) after costing a device call. Bind its plan here, on the CPU."""

import inspect
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_sanitize_small_plan_binds_to_the_tests_signatures():
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT))
    from tests.gpu import sanitize_small

    plan = sanitize_small.calls(torch.Generator())
    assert len(plan) > 10
    for fn, kwargs in plan:
        inspect.signature(fn).bind(**kwargs)  # TypeError names the missing / unexpected argument
