import pytest
import torch

from rtlynx import backends


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Every test sees the one-time warnings afresh."""
    backends._warned.clear()
    yield


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh random inputs every run


def brute_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Independent N:M mask: python loops, sort by (-|x| with NaN as +inf, index)."""
    flat = x.reshape(-1, x.shape[-1]).tolist()
    out = []
    for row in flat:
        keep = [False] * len(row)
        for g in range(0, len(row), m):
            grp = row[g:g + m]
            key = [float("inf") if v != v else abs(v) for v in grp]
            order = sorted(range(m), key=lambda i: (-key[i], i))
            for i in order[:n]:
                keep[g + i] = True
        out.append(keep)
    return torch.tensor(out, dtype=torch.bool).reshape(x.shape)


def pytest_collection_modifyitems(config, items):
    """GPU tests run on the device machine and skip cleanly everywhere else."""
    has_cuda = torch.cuda.is_available()
    is_sm90 = has_cuda and torch.cuda.get_device_capability(0) == (9, 0)
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif "sm90" in item.keywords and not is_sm90:
            item.add_marker(pytest.mark.skip(reason="needs an sm_90 (Hopper) GPU"))
