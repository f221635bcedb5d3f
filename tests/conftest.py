import importlib.util
import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from rtlynx import backends
from rtlynx.reference import fp8 as ref_fp8
from rtlynx.reference import sm90 as ref90

def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# One seed per session, fresh each run unless RTLYNX_TEST_SEED fixes it; each test's own seed is derived from it and
# the test's id, so one failing test reruns alone with the same numbers (its report says how).
SESSION_SEED = int(os.environ.get("RTLYNX_TEST_SEED") or random.SystemRandom().randrange(2**31))


def test_seed(nodeid: str) -> int:
    return (SESSION_SEED + zlib.crc32(nodeid.encode())) % 2**31


test_seed.__test__ = False  # a helper, not a test


def pytest_report_header(config):
    return f"rtlynx test seeds from RTLYNX_TEST_SEED={SESSION_SEED}"


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Seeds torch, numpy and random for every test; the value is in the test's report if it fails."""
    s = test_seed(request.node.nodeid)
    request.node.user_properties.append(("seed", s))
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if rep.failed:
        s = dict(item.user_properties).get("seed")
        rep.sections.append(("random seed", f"this test ran with seed {s}; rerun it with the same numbers: "
                                            f"RTLYNX_TEST_SEED={SESSION_SEED} python -m pytest '{item.nodeid}'"))


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Every test sees the one-time warnings afresh."""
    backends._warned.clear()
    yield


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)  # fresh random inputs every run, logged by the seed fixture


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


def brute_sparse_act_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """Independent float64 reference of one SparseActLinear's output on its input x: brute-force N:M mask, the
    norm scale straight from its definition, dense LoRA on x."""
    x64 = x.detach().double().reshape(-1, x.shape[-1])
    k, m = x64.shape[-1], layer.m
    xp = torch.nn.functional.pad(x64, (0, -k % m))
    kept = xp * brute_mask(xp, layer.n, m)
    w = torch.nn.functional.pad(layer.weight.detach().double(), (0, -k % m))
    y = kept @ w.T
    if layer.compensation == "norm":
        y = y * torch.sqrt((x64 ** 2).sum(-1) / ((kept ** 2).sum(-1) + layer.eps)).unsqueeze(-1)
    if layer.bias is not None:
        y = y + layer.bias.detach().double()
    if layer.lora_rank and layer.lora_enabled:
        y = y + (x64 @ layer.lora_A.detach().double().T) @ layer.lora_B.detach().double().T
    return y.reshape(*x.shape[:-1], -1)


# ------------------------------------------------------------------ the site kernels' reference twins, on the CPU
class SiteTwin:
    """Stands in for the site kernels on the CPU (rtlynx.ops.lynx_site_linear / sparse_site / fp8_site): their
    reference twins (rtlynx.reference.sm90.site_linear_sm90, the FP8 producer + GEMM of rtlynx.reference.fp8),
    recording each eager call's ``(x shape, operand shape)`` (not traced: a list growing inside a compiled graph would
    be a guard that fails at every call)."""

    def __init__(self):
        self.calls = []

    def record(self, x2, w):
        if not torch.compiler.is_compiling():
            self.calls.append((tuple(x2.shape), tuple(w.shape)))

    def __call__(self, x2, wext, bias, lora_a, splits, norm=True, eps=1e-8, centre=None, centre_rows=None):
        self.record(x2, wext)
        y = ref90.site_linear_sm90(x2, wext, bias, lora_a, norm, eps, centre, centre_rows)
        return list(y.split(list(splits), dim=1))

    def fp8(self, x2, wq, sw, bias, splits, norm=True, eps=1e-8, act=0, check=True, lora_a=None, lora_b=(),
            lora_terms=(), centre=None, centre_rows=None):
        self.record(x2, wq)
        if x2.shape[0] == 0:
            return [x2.new_empty(0, n) for n in splits]
        if centre is not None:  # the rows the centred prune reads; the tail below runs on them too
            x2 = ref90.centred_operand(x2, centre, centre_rows)
        values, meta, rs, _, _ = ref_fp8.compress_sm90_fp8(x2, eps, norm, "gelu_tanh" if act else None)
        outs, off = [], 0
        for n in splits:
            b = None if bias is None else bias[off: off + n]
            outs.append(ref_fp8.sparse_gemm_fp8(values, meta, wq[off: off + n], rs, sw[off: off + n], b, x2.dtype))
            off += n
        if lora_a is not None:  # the tail in float32 on the dense x, each output rounded once
            h = x2.float() @ lora_a.float().t()
            acc = [o.float() for o in outs]
            for t, b in enumerate(lora_b):
                i, c0, c1 = lora_terms[3 * t: 3 * t + 3]
                acc[i] += h[:, c0:c1] @ b.float().t()
            outs = [a.to(o.dtype) for a, o in zip(acc, outs)]
        return outs


@pytest.fixture
def fused_cpu(monkeypatch):
    """Sites take their fused path on the CPU, the kernels replaced by their reference twins (:class:`SiteTwin`)."""
    import rtlynx.ops as ops
    from rtlynx import sites
    from rtlynx.families import family_of

    twin = SiteTwin()
    monkeypatch.setattr(ops, "lynx_site_linear", twin)  # the first, checked call of a site
    monkeypatch.setattr(ops, "sparse_site", twin)       # the calls after it
    monkeypatch.setattr(ops, "fp8_site", twin.fp8)
    monkeypatch.setattr(ops, "centre_in_kernels", lambda dtype="native": True)  # a library with the centring prune
    monkeypatch.setattr(sites.Site, "_fusable", lambda self, cfg, backend, x2: backend in ("auto", "lynx")
                        and self._uniform and family_of(cfg.dtype).operand_ok(self, x2))
    monkeypatch.setattr(sites.Site, "_speed_dense", lambda self, cfg, backend, x2: False)
    return twin
