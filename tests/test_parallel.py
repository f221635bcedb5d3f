"""rtlynx.parallel on the CPU: two processes (torch.distributed gloo) against the single-process outputs.

One spawn of two workers runs every multi-process check (a process start with torch and diffusers costs seconds on a
2-core machine); each test below reads its check's result. The workers run diffusers' own context and tensor
parallelism on CPU tensors: diffusers gates ``enable_parallelism`` to accelerators (the device is ``rank %
accelerator count``, tensor parallelism names its device types), while its CP / TP code is device-agnostic, so the
workers lift those two gates in their own process (rtlynx.parallel.allow_cpu_parallelism). On GPUs the same runs
without it (tests/gpu/test_parallel_gpu.py, benchmarks/multi_gpu.py).
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rtlynx
from conftest import SESSION_SEED, brute_mask, brute_sparse_act_linear, test_seed
from rtlynx import parallel, reference
from rtlynx.config import SparsityConfig
from rtlynx.nn import SparseActLinear
from rtlynx.sites import Site

diffusers = pytest.importorskip("diffusers")
from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer  # noqa: E402

WORLD = 2
try:  # tensor parallelism came to diffusers after context parallelism
    from diffusers.hooks.tensor_parallel import resolve_tp_shard_specs  # noqa: F401
    HAS_TP = True
except ImportError:
    HAS_TP = False
TOL = 1e-5  # float32 end to end: the parallel and single-process sums differ in order only
# FLUX with head_dim 6: the single block's proj_out reads [attention (12) | MLP (48)], so a split over 2 ranks
# leaves blocks of 6: groups of 4 would straddle the shard boundary.
MISALIGNED_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=6,
                       num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                       axes_dims_rope=[2, 2, 2])


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------ single process
def test_shard_slices_follow_packed_blocks():
    full = torch.arange(20).reshape(1, 20)
    sh = [parallel.Shard("rowwise", (8, 12), None, r, 2) for r in range(2)]
    assert [s.local_slices() for s in sh] == [[slice(0, 4), slice(8, 14)], [slice(4, 8), slice(14, 20)]]
    assert sh[1].local(full, 1).tolist() == [[4, 5, 6, 7, 14, 15, 16, 17, 18, 19]]


def test_check_split_errors():
    cfg = SparsityConfig()
    parallel.check_split("a", "colwise", (6,), 2, cfg, cuda=True)  # column splits never straddle a group
    parallel.check_split("a", "rowwise", (16, 48), 2, cfg, cuda=True)
    with pytest.raises(ValueError, match="straddle"):
        parallel.check_split("a", "rowwise", (12, 48), 2, cfg, cuda=False)  # 6 per rank: not whole groups of 4
    with pytest.raises(ValueError, match="multiple of 8"):
        parallel.check_split("a", "rowwise", (24,), 2, cfg, cuda=True)  # 12 per rank: whole groups, not 8-wide
    parallel.check_split("a", "rowwise", (24,), 2, SparsityConfig(backend="reference"), cuda=True)
    with pytest.raises(ValueError, match="fp8"):
        parallel.check_split("a", "rowwise", (64,), 2, SparsityConfig(dtype="fp8"), cuda=False)
    with pytest.raises(ValueError, match="unsupported"):
        parallel.check_split("a", "sequence", (64,), 2, cfg, cuda=False)


def test_site_rejects_members_split_differently():
    a, b = SparseActLinear(nn.Linear(8, 8)), SparseActLinear(nn.Linear(8, 8))
    a._tp = parallel.Shard("colwise", (16,), None, 0, 2)
    with pytest.raises(ValueError, match="split differently"):
        Site([a, b], "plain", "s")


def test_sparsify_refuses_a_linear_with_diffusers_hooks():
    from diffusers.hooks import HookRegistry, ModelHook

    model = tiny_transformer("flux")
    HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0].attn.to_q).register_hook(ModelHook(), "x")
    with pytest.raises(ValueError, match="diffusers hooks"):
        rtlynx.sparsify(model)
    assert not rtlynx.api.sparse_layers(model)


def test_cp_wrapper_is_installed_and_removed():
    model = tiny_transformer("flux")
    rtlynx.sparsify(model)
    assert model.enable_parallelism.func is parallel.enable_parallelism  # a functools.partial (it pickles)
    rtlynx.unsparsify(model)
    assert "enable_parallelism" not in model.__dict__


# ------------------------------------------------------------------------------------------------ two processes
def _heavy(g, *shape):
    """Activations with a few large channels per token (what makes pruning choices matter)."""
    return torch.randn(*shape, generator=g) * torch.randn(shape[-1], generator=g).exp()


def check_norm_scale(rank, seed):
    """The sharded norm-scale reduction vs the single-process spec and a float64 brute force."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(seed)
    x = _heavy(g, 16, 128)
    x[3] = 0.0          # a zero row: s = 0 / eps = 0
    x[5] = 1.0          # all ties: the lower indices are kept
    sh = parallel.Shard("rowwise", (32, 96), dist.group.WORLD, rank, WORLD)
    xl = sh.local(x, 1)
    s = parallel.global_norm_scale(xl, reference.prune_nm(xl), 1e-8, dist.group.WORLD)
    x64 = x.double()
    kept = x64 * brute_mask(x, 2, 4)
    brute = torch.sqrt((x64 ** 2).sum(-1) / ((kept ** 2).sum(-1) + 1e-8))
    per_shard = reference.norm_scale(xl)  # the per-shard variant: not the single-GPU value
    return dict(err=_rel(s, reference.norm_scale(x)), brute_err=_rel(s, brute), per_shard_err=_rel(per_shard, brute))


def _full_layer(g, k, n, rank_r):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        lin.bias.copy_(torch.randn(n, generator=g))
    layer = SparseActLinear(lin, lora_rank=rank_r, speed_rules=False)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(rank_r, k, generator=g) / k ** 0.5)
        layer.lora_B.copy_(torch.randn(n, rank_r, generator=g) * 0.1)
    return layer


def _split_layer(full, sh):
    """A hand-built tensor-parallel shard of ``full`` (what rtlynx.sparsify makes of a diffusers-sharded layer)."""
    w, b, a, bb = (t.detach() for t in (full.weight, full.bias, full.lora_A, full.lora_B))
    col = sh.style == "colwise"
    wl = sh.local(w, 0 if col else 1)
    lin = nn.Linear(wl.shape[1], wl.shape[0], device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(wl)
        lin.bias.copy_(sh.local(b, 0) if col else b)
    layer = SparseActLinear(lin, lora_rank=a.shape[0], speed_rules=False)
    with torch.no_grad():
        layer.lora_A.copy_(a if col else sh.local(a, 1))
        layer.lora_B.copy_(sh.local(bb, 0) if col else bb)
    layer._tp = sh
    Site([layer], "plain", f"{sh.style} layer")
    return layer


def check_split_layer(rank, seed):
    """Row- and column-parallel shards of one SparseActLinear (norm compensation, bias, LoRA) vs the float64 brute
    force of the whole layer; the row-parallel one also in the dense and weight modes."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(seed)
    full = _full_layer(g, 128, 48, 4)
    x = _heavy(g, 3, 5, 128)
    want = brute_sparse_act_linear(full, x)
    grp = dist.group.WORLD
    row = _split_layer(full, parallel.Shard("rowwise", (128,), grp, rank, WORLD))
    col = _split_layer(full, parallel.Shard("colwise", (48,), grp, rank, WORLD))
    xl = row._tp.local(x, -1)
    out = dict(row=_rel(row(xl), want), col=_rel(col(x), col._tp.local(want, -1)))
    w, b = full.weight.detach(), full.bias.detach()
    row.mode = "dense"
    out["row_dense"] = _rel(row(xl), F.linear(x, w, b))
    row.mode = "weight"
    out["row_weight"] = _rel(row(xl), F.linear(x, reference.prune_weight_magnitude(w), b))
    del row.mode
    row.compensation = "none"
    kept = x.double() * brute_mask(x, 2, 4)
    want_plain = kept @ w.double().T + b.double() + (x.double() @ full.lora_A.double().T) @ full.lora_B.double().T
    out["row_no_norm"] = _rel(row(xl), want_plain)
    return out


def _cp_check(kind, cp):
    from diffusers import ContextParallelConfig

    size = dict(height=8, width=8, frames=2) if kind == "wan" else dict(height=8, width=8)
    model = tiny_transformer(kind)  # the same seed on both ranks: the same weights
    inputs = example_inputs(model, text_len=6, **size)
    with torch.no_grad():
        dense = output_tensor(model(**inputs))
    rtlynx.sparsify(model, speed_rules=False)
    with torch.no_grad():
        sparse = output_tensor(model(**inputs))
    model.enable_parallelism(config=ContextParallelConfig(**{f"{cp}_degree": WORLD}))
    with torch.no_grad():
        got = output_tensor(model(**inputs))
        with rtlynx.dense_mode(model):
            got_dense = output_tensor(model(**inputs))
    return dict(err=_rel(got, sparse), dense_err=_rel(got_dense, dense), sparse_vs_dense=_rel(sparse, dense))


def _sparsify_after(config) -> dict:
    """model.enable_parallelism(config) on the dense model, then rtlynx.sparsify, vs the single-process sparse
    output of the same weights."""
    model = tiny_transformer("flux")
    inputs = example_inputs(model)
    rtlynx.sparsify(model, speed_rules=False)
    with torch.no_grad():
        want = output_tensor(model(**inputs))
    rtlynx.unsparsify(model)
    model.enable_parallelism(config=config)
    rtlynx.sparsify(model, speed_rules=False)
    with torch.no_grad():
        return dict(err=_rel(output_tensor(model(**inputs)), want))


def check_cp(rank, seed):
    """diffusers' context parallelism (Ulysses) of sparsified FLUX and Wan vs their single-process outputs, and
    sparsify after enable_parallelism. (Ring attention needs an attention backend that returns the log-sum-exp: cuDNN
    / flash, CUDA only; the GPU test runs it.)"""
    out = {kind: _cp_check(kind, "ulysses") for kind in ("flux", "wan")}
    from diffusers import ContextParallelConfig

    out["flux, sparsified after"] = _sparsify_after(ContextParallelConfig(ulysses_degree=WORLD))
    return out


def _lora_flux(seed):
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, speed_rules=False, lora_rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in rtlynx.api.sparse_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    for site in rtlynx.sites.model_sites(model):
        site.build()
    return model


def check_tp_sparsify_first(rank, seed):
    """rtlynx.sparsify (LoRA, one layer overridden dense) -> model.enable_parallelism(TensorParallelConfig)."""
    from diffusers import TensorParallelConfig

    model = _lora_flux(seed)
    model.transformer_blocks[1].ff.net[2].mode = "dense"
    inputs = example_inputs(model)
    with torch.no_grad():
        want = output_tensor(model(**inputs))
    model.enable_parallelism(config=TensorParallelConfig(tp_degree=WORLD))
    layers = rtlynx.api.sparse_layers(model)
    with torch.no_grad():
        got = output_tensor(model(**inputs))
    refused = []
    for action in (lambda: rtlynx.save(model, "/nonexistent/never-written"), lambda: rtlynx.unsparsify(model),
                   lambda: rtlynx.load(model, "/nonexistent/never-read")):
        try:
            action()
        except ValueError as e:
            refused.append("tensor parallelism" in str(e))
    return dict(err=_rel(got, want), sparse=len(layers),
                rowwise=sum(l._tp is not None and l._tp.style == "rowwise" for l in layers.values()),
                colwise=sum(l._tp is not None and l._tp.style == "colwise" for l in layers.values()),
                override_kept=model.transformer_blocks[1].ff.net[2].mode == "dense", refused=refused)


def check_tp_sharded_first(rank, seed):
    """model.enable_parallelism(TensorParallelConfig) -> rtlynx.sparsify, vs the single-process sparse output."""
    from diffusers import TensorParallelConfig

    return _sparsify_after(TensorParallelConfig(tp_degree=WORLD))


def check_tp_misaligned(rank, seed):
    """A split that would put groups of 4 across a shard boundary: a clear error and the model left as it was, in
    either order."""
    from diffusers import FluxTransformer2DModel, TensorParallelConfig

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**MISALIGNED_FLUX).eval()
    inputs = example_inputs(model)
    rtlynx.sparsify(model, speed_rules=False)
    with torch.no_grad():
        before = output_tensor(model(**inputs))
    out = {}
    try:
        model.enable_parallelism(config=TensorParallelConfig(tp_degree=WORLD))
    except ValueError as e:
        out["sparse_first"] = str(e)
    with torch.no_grad():
        out["unchanged"] = _rel(output_tensor(model(**inputs)), before) == 0.0 and not parallel.is_sharded(model)
    rtlynx.unsparsify(model)
    model.enable_parallelism(config=TensorParallelConfig(tp_degree=WORLD))
    try:
        rtlynx.sparsify(model, speed_rules=False)
    except ValueError as e:
        out["sharded_first"] = str(e)
    out["no_sparse_layers"] = not rtlynx.api.sparse_layers(model)
    return out


CHECKS = {f.__name__: f for f in (check_norm_scale, check_split_layer, check_cp,
                                  *((check_tp_sparsify_first, check_tp_sharded_first, check_tp_misaligned)
                                    if HAS_TP else ()))}
needs_tp = pytest.mark.skipif(not HAS_TP, reason="this diffusers has no tensor parallelism")


def _worker(rank, port, seed, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel.allow_cpu_parallelism()
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {}
    for name, check in CHECKS.items():
        torch.manual_seed(seed)
        try:
            results[name] = ("ok", check(rank, seed))
        except Exception:
            results[name] = ("error", traceback.format_exc())
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    seed = test_seed("tests/test_parallel.py::workers")
    print(f"workers seed {seed} (RTLYNX_TEST_SEED={SESSION_SEED})")
    out = tmp_path_factory.mktemp("parallel")
    mp.spawn(_worker, args=(_port(), seed, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _get(results, name, request):
    request.node.user_properties.append(("workers seed", test_seed("tests/test_parallel.py::workers")))
    got = []
    for rank, res in enumerate(results):
        status, value = res[name]
        assert status == "ok", f"rank {rank}:\n{value}"
        got.append(value)
    return got


def test_sharded_norm_scale_equals_single_process(results, request):
    for r in _get(results, "check_norm_scale", request):
        assert r["err"] < 1e-6 and r["brute_err"] < 1e-6, r
        assert r["per_shard_err"] > 1e-3, r  # the check can tell the per-shard scale apart


def test_hand_split_layer_equals_whole_layer(results, request):
    for r in _get(results, "check_split_layer", request):
        assert max(r.values()) < TOL, r


def test_context_parallel_equals_single_process(results, request):
    for r in _get(results, "check_cp", request):
        for case, v in r.items():
            assert v["err"] < TOL and v.get("dense_err", 0.0) < TOL, (case, v)
            assert v.get("sparse_vs_dense", 1.0) > 1e-3, (case, v)  # the sparse output is not the dense one


@needs_tp
def test_tensor_parallel_sparsify_first(results, request):
    for r in _get(results, "check_tp_sparsify_first", request):
        assert r["err"] < TOL, r
        # tiny FLUX: 2 blocks x (Q, K, V, MLP up) + 2 single blocks x (Q, K, V, proj_mlp) colwise;
        # 2 MLP down + 2 single-block proj_out (packed) rowwise
        assert (r["sparse"], r["colwise"], r["rowwise"]) == (20, 16, 4), r
        assert r["override_kept"] and r["refused"] == [True, True, True], r


@needs_tp
def test_tensor_parallel_sharded_first(results, request):
    for r in _get(results, "check_tp_sharded_first", request):
        assert r["err"] < TOL, r


@needs_tp
def test_tensor_parallel_misaligned_split_is_refused(results, request):
    for r in _get(results, "check_tp_misaligned", request):
        for order in ("sparse_first", "sharded_first"):
            assert "proj_out" in r.get(order, "") and "straddle" in r[order], r
        assert r["unchanged"] and r["no_sparse_layers"], r
