"""CPU checks of the sm90 layout functions and of rtlynx.ops' CPU-side behaviour (no GPU needed)."""

import itertools

import pytest
import torch

from rtlynx.reference import LAYOUTS, compress, decompress, norm_scale, prune_nm
from rtlynx.reference import sm90


def _x(m, k, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype)


def test_sm90_registered():
    assert LAYOUTS["sm90"] is sm90.compress_sm90


@pytest.mark.parametrize("m,k", [(1, 64), (5, 128), (64, 128), (65, 200), (130, 384), (333, 520)])
def test_meta_roundtrip(m, k):
    x = _x(m, k)
    mp, kp = sm90.padded_shape(m, k)
    _, meta_rows = compress(torch.nn.functional.pad(x, (0, kp - k, 0, mp - m)))
    meta = sm90.rows_meta_to_sm90(meta_rows)
    assert meta.shape == (mp * kp // 8,)
    assert torch.equal(sm90.sm90_meta_to_rows(meta, m, k), meta_rows)


def test_permutation_is_bijection_and_matches_cute_atom():
    mp, kp = 192, 384
    dest = sm90._word_permutation(mp, kp)
    assert torch.equal(dest.sort().values, torch.arange(mp * kp // 16))
    # CuTe layout ((8,2,4),(16,2,4)):((128,16,2048),(1,1024,32)) in logical elements, atoms M-first.
    for mm, kk in itertools.product([0, 1, 7, 8, 15, 16, 63, 64, 130, 191], [0, 16, 32, 48, 112, 128, 368]):
        m0, m1, m2, ma = mm % 8, (mm // 8) % 2, (mm // 16) % 4, mm // 64
        ki = kk % 128
        k0, k1, k2, ka = ki % 16, (ki // 16) % 2, ki // 32, kk // 128
        off = k0 + 16 * m1 + 32 * k2 + 128 * m0 + 1024 * k1 + 2048 * m2 + 8192 * ma + (mp * 128) * ka
        assert dest[mm * (kp // 16) + kk // 16].item() == off // 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compress_sm90_decodes_to_prune(dtype):
    x = _x(70, 264, dtype, seed=3)
    x[3, 5] = float("nan")
    x[4, :8] = 0.0
    x[5, 8:12] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=dtype)  # ties: lower index wins
    values, meta, scale = sm90.compress_sm90(x)
    mp, kp = sm90.padded_shape(70, 264)
    assert values.shape == (70, kp // 2) and values.dtype == dtype
    assert meta.dtype == torch.uint8 and meta.numel() == mp * kp // 8
    dense = sm90.decompress_sm90(values, meta, 264)
    ref = prune_nm(x)
    assert torch.equal(dense.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(dense), torch.nan_to_num(ref))
    torch.testing.assert_close(scale, norm_scale(x), equal_nan=True)


def test_padding_groups_keep_first_two():
    x = _x(3, 128)
    _, meta, _ = sm90.compress_sm90(x)
    rows = sm90.sm90_meta_to_rows(meta, 3, 128)
    assert bool((rows[3:] == 0x44).all())  # padded rows: zero groups keep indices 0, 1


def test_expand_lora_b_matches_tail_product():
    g = torch.Generator().manual_seed(1)
    m, k, n, r = 9, 200, 24, 16
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    a = torch.randn(r, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, r, generator=g, dtype=torch.float64)
    wext = sm90.expand_lora_b(w, b, k)
    kp = sm90.round_up(k, 128)
    rp = sm90.round_up(r, 64)
    assert wext.shape == (n, kp + 2 * rp)
    s = norm_scale(x)
    h = x @ a.T
    tail_vals = sm90.lora_tail(h, s)  # [m, rp]
    # the tail's groups keep slots 0 and 2 (nibble 0b1000): value t at logical column 2t, written out by hand
    tail_logical = torch.zeros(m, 2 * rp, dtype=x.dtype)
    for t in range(rp):
        tail_logical[:, 2 * t] = tail_vals[:, t]
    assert torch.equal(sm90.tail_dense(tail_vals), tail_logical)
    xext = torch.cat([torch.nn.functional.pad(prune_nm(x), (0, kp - k)), tail_logical], 1)
    y = s.unsqueeze(1) * (xext @ wext.T)
    ref = s.unsqueeze(1) * (prune_nm(x) @ w.T) + h @ b.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)  # lora_tail works in float32


def test_rows_layout_unchanged_by_registration():
    x = _x(4, 16)
    v, mt = LAYOUTS["rows"](x, 2, 4)
    assert torch.equal(decompress(v, mt), prune_nm(x))


def test_ops_import_loads_and_builds_nothing(tmp_path):
    """Importing rtlynx (and rtlynx.ops) must not build or load the CUDA library, look for nvcc or import triton:
    checked in a fresh interpreter whose nvcc is a script that leaves a mark if anything runs it."""
    import os
    import subprocess
    import sys

    mark = tmp_path / "nvcc_ran"
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    nvcc.chmod(0o755)
    code = ("import sys, rtlynx, rtlynx.ops; from rtlynx.ops import _lib; "
            "print(_lib._LIB is None, 'rtlynx.ops._build' in sys.modules, 'triton' in sys.modules)")
    env = {**os.environ, "RTLYNX_NVCC": str(nvcc), "CUDA_HOME": str(tmp_path),
           "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False", "False"] and not mark.exists()


def test_ops_status_on_cpu():
    import rtlynx.ops as ops

    ok, why = ops.lynx_status()
    if not torch.cuda.is_available():
        assert not ok and "CUDA" in why
    assert issubclass(ops.Unsupported, RuntimeError)


def test_ops_fake_shapes_on_meta_device():
    import rtlynx.ops as ops

    x = torch.empty(333, 3072, dtype=torch.bfloat16, device="meta")
    values, meta, scale = ops.prune_compress(x)
    assert values.shape == (333, 1536) and meta.shape == (384 * 3072 // 8,) and scale.shape == (333,)
    w = torch.empty(1024, 3072, dtype=torch.bfloat16, device="meta")
    y = ops.lynx_linear(x, w, None, True, None, None)
    assert y.shape == (333, 1024) and y.dtype == torch.bfloat16


def test_ops_unsupported_pattern():
    import rtlynx.ops as ops

    x = torch.empty(4, 64, dtype=torch.bfloat16, device="meta")
    w = torch.empty(8, 64, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ops.Unsupported):
        ops.lynx_linear(x, w, None, True, None, None, n=1, m=4)
    with pytest.raises(ops.Unsupported):
        ops.lynx_linear(x.float(), w.float(), None, True, None, None)


def test_weight_cache_frees_the_copy_of_a_replaced_lora():
    # The [W | B] operand of a LoRA layer is a full copy of W: it must go when its LoRA goes (re-sparsify,
    # a new LoRA), not linger while the base weight lives. Pure Python logic, checked on CPU tensors.
    import gc

    from rtlynx.ops.sm90 import _WeightCache

    cache = _WeightCache()
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    b1 = torch.randn(64, 8, dtype=torch.bfloat16)
    first = cache.get(w, b1, 256)
    assert cache.get(w, b1, 256) is first and cache.entries() == 1  # hit
    b2 = torch.randn(64, 8, dtype=torch.bfloat16)
    second = cache.get(w, b2, 256)
    assert cache.entries() == 2 and second is not first
    del b1, first
    gc.collect()
    assert cache.entries() == 1  # b1's copy dropped with b1
    with torch.no_grad():
        b2.add_(1.0)  # in-place change of the LoRA: rebuilt, not served stale
    third = cache.get(w, b2, 256)
    assert third is not second and cache.entries() == 1
    assert torch.equal(third, sm90.expand_lora_b(w, b2, 256))
    del w, b2, second, third
    gc.collect()
    assert cache.entries() == 0
