"""Each operand refusal of the lynx ops on the device (CPU versions with meta tensors: tests/test_op_checks.py):
the call raises Unsupported before any launch, and the device is fine afterwards (a good call still matches).
Under compute-sanitizer: tests/gpu/sanitize_checks.py."""

import pytest
import torch

from rtlynx import ops
from rtlynx.ops import sm90 as k90

BF = torch.bfloat16


def _cuda(*shape, dtype=BF):
    return torch.randn(*shape, device="cuda").to(dtype)


def _operands(m=70, n=64, k=256):
    x = _cuda(m, k)
    values, meta, scale = ops.prune_compress(x)
    return x, [values, meta, k90.prepare_weight(_cuda(n, k)), scale, _cuda(n)]


def _misaligned(t):
    """Same shape and strides, start moved by one element (2 bytes): not 16-byte aligned."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    return flat[1:1 + t.numel()].view(t.shape)


BAD_GEMM = {
    "meta_short": (1, lambda a: a[1][:-1], "meta"),
    "meta_int8": (1, lambda a: a[1].view(torch.int8), "uint8"),
    "meta_cpu": (1, lambda a: a[1].cpu(), "device"),
    "weight_fp16": (2, lambda a: a[2].half(), "bfloat16"),
    "weight_transposed": (2, lambda a: a[2].t().contiguous().t(), "row-major"),
    "weight_misaligned": (2, lambda a: _misaligned(a[2]), "16-byte"),
    "weight_cpu": (2, lambda a: a[2].cpu(), "device"),
    "weight_k_short": (2, lambda a: a[2][:, :128], "values"),
    "scale_bf16": (3, lambda a: a[3].to(BF), "float32"),
    "scale_short": (3, lambda a: a[3][:-1], "scale"),
    "scale_cpu": (3, lambda a: a[3].cpu(), "device"),
    "bias_fp32": (4, lambda a: a[4].float(), "bfloat16"),
    "bias_short": (4, lambda a: a[4][:32], "bias"),
    "bias_strided": (4, lambda a: torch.stack([a[4], a[4]], 1)[:, 0], "contiguous"),
    "bias_cpu": (4, lambda a: a[4].cpu(), "device"),
    "values_misaligned": (0, lambda a: _misaligned(a[0]), "16-byte"),
}


@pytest.mark.parametrize("case", sorted(BAD_GEMM))
def test_gemm_refusal_on_device(case):
    slot, make, match = BAD_GEMM[case]
    x, args = _operands()
    good = k90.sparse_gemm_sm90(*args)
    bad = list(args)
    bad[slot] = make(args)
    with pytest.raises(ops.Unsupported, match=match):
        k90.sparse_gemm_sm90(*bad)
    torch.cuda.synchronize()  # no asynchronous fault left behind
    assert torch.equal(k90.sparse_gemm_sm90(*args), good)


def test_gemm_unknown_config():
    _, args = _operands()
    with pytest.raises(ops.Unsupported, match="config"):
        k90.sparse_gemm_sm90(*args, len(k90.CONFIG_NAMES))


def test_linear_and_site_refusals_on_device():
    x = _cuda(70, 256)
    w = _cuda(64, 256)
    for call, match in (
            (lambda: ops.lynx_linear(x, w.cpu(), None, True, None, None), "weight .* device"),
            (lambda: ops.lynx_linear(x, w, _cuda(64).cpu(), True, None, None), "bias .* device"),
            (lambda: ops.lynx_linear(x, w, None, True, _cuda(16, 256).cpu(), _cuda(64, 16)), "lora_a .* device"),
            (lambda: ops.lynx_gelu_linear(x, w, _cuda(32)), "bias"),
            (lambda: k90.sparse_linear_sm90(x, w.t().contiguous().t(), None, None, None, True, 1e-8), "row-major"),
            (lambda: k90.prune_compress_sm90(_misaligned(x), None, True, 1e-8), "16-byte"),
            (lambda: ops.lynx_site_linear(x, w.cpu(), None, None, (64,)), "site operand .* device"),
            (lambda: ops.lynx_site_linear(x, _misaligned(w), None, None, (64,)), "16-byte"),
            (lambda: ops.lynx_site_linear(x, w, _cuda(64, dtype=torch.float16), None, (64,)), "site bias"),
            (lambda: k90.sparse_site_sm90(x, w, None, None, [32, 24], True, 1e-8), "splits"),
            (lambda: k90.gelu_site_sm90(x, w, _cuda(64).cpu(), True, 1e-8), "site bias")):
        with pytest.raises(ops.Unsupported, match=match):
            call()
    torch.cuda.synchronize()


def test_fp8_refusals_on_device():
    from rtlynx.ops import fp8 as kf8

    x = _cuda(70, 256)
    wq, sw = kf8.quantize_weight(_cuda(64, 256))
    good = ops.fp8_site(x, wq, sw, None, [64])[0]
    v, meta, rs, _, _ = kf8.prune_quant_fp8_sm90(x, True, 1e-8)
    for call, match in (
            (lambda: ops.fp8_site(x, wq.cpu(), sw, None, [64]), "wq .* device"),
            (lambda: ops.fp8_site(x, wq, sw.cpu(), None, [64]), "sw .* device"),
            (lambda: ops.fp8_site(x, wq, sw, _cuda(64, dtype=torch.float16), [64]), "site bias"),
            (lambda: ops.fp8_site(x, _misaligned(wq), sw, None, [64]), "16-byte"),
            (lambda: kf8.fp8_site_sm90(x, wq, sw, None, [32, 24], True, 1e-8), "splits"),
            (lambda: kf8.sparse_gemm_fp8_sm90(_misaligned(v), meta, wq, rs, sw, None), "16-byte"),
            (lambda: kf8.sparse_gemm_fp8_sm90(v, meta, wq, rs.cpu(), sw, None), "rs .* device"),
            (lambda: kf8.sparse_gemm_fp8_sm90(v, meta, wq.t().contiguous().t(), rs, sw, None), "row-major")):
        with pytest.raises(ops.Unsupported, match=match):
            call()
    torch.cuda.synchronize()
    assert torch.equal(ops.fp8_site(x, wq, sw, None, [64])[0], good)


def test_fp8_site_checks_once_per_eager_call(monkeypatch):
    """ops.fp8_site(check=True) validates the operands once and calls the unchecked implementation."""
    from rtlynx.ops import _checks
    from rtlynx.ops import fp8 as kf8

    calls = []
    real = _checks.check_fp8_site
    counting = lambda *a: calls.append(1) or real(*a)  # noqa: E731
    monkeypatch.setattr(_checks, "check_fp8_site", counting)  # the ops' own checks (rtlynx.ops.fp8)
    monkeypatch.setattr(ops, "check_fp8_site", counting)      # rtlynx.ops.fp8_site's
    x = _cuda(70, 256)
    wq, sw = kf8.quantize_weight(_cuda(64, 256))
    ops.fp8_site(x, wq, sw, None, [32, 32])
    assert len(calls) == 1
    kf8.fp8_site_sm90(x, wq, sw, None, [32, 32], True, 1e-8)  # the op checks for itself
    assert len(calls) == 2
