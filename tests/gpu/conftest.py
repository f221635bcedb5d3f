"""GPU suite of the sm90 lynx kernels: ``pytest -m gpu tests/gpu``. Skips cleanly without an sm_90 GPU."""

import pytest
import torch


def _why_not() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs sm_90, have sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    from rtlynx.ops import lynx_status

    ok, why = lynx_status()
    return None if ok else why


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if "tests/gpu" not in str(item.fspath).replace("\\", "/"):
            continue
        item.add_marker(pytest.mark.gpu)
        item.add_marker(pytest.mark.sm90)
        if not checked:
            reason, checked = _why_not(), True
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
