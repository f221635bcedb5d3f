"""rtlynx.parallel on the lynx kernels.

- One GPU: two processes on the same GPU (gloo all-reduces CUDA tensors) run hand-built row- and column-parallel
  shards of a bf16 SparseActLinear on the lynx kernels (prune_compress + sparse_gemm with the all-reduced norm
  scale) against the float32 reference spec of the whole layer.
- Two GPUs (NCCL; skipped with fewer): a bf16 FLUX-class transformer under diffusers' context parallelism (Ulysses,
  and ring on the cuDNN attention backend) and tensor parallelism, against the single-GPU sparse output of the same
  weights and inputs.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
import warnings
from pathlib import Path

import pytest
import torch

import rtlynx
from rtlynx import parallel, reference
from test_parallel import _full_layer, _heavy, _rel, _split_layer  # CPU twins of the helpers

BF16_TOL = 1e-2      # one layer: bf16 operands and one bf16 all-reduce of the partial outputs
MODEL_TOL = 3e-2     # a whole bf16 forward; a near-tie flipped by rounding moves a few tokens downstream
MID_FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                num_attention_heads=4, joint_attention_dim=512, pooled_projection_dim=256, axes_dims_rope=(16, 56, 56))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(worker, world, seed, tmp_path, backend):
    import torch.multiprocessing as mp

    print(f"seed {seed}")  # reproduce a failure with this seed
    mp.spawn(_main, args=(worker, world, _port(), seed, str(tmp_path), backend), nprocs=world, join=True)
    out = []
    for r in range(world):
        status, value = torch.load(Path(tmp_path) / f"rank{r}.pt")
        assert status == "ok", f"rank {r}:\n{value}"
        out.append(value)
    return out


def _main(rank, worker, world, port, seed, out_dir, backend):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180))
    try:
        result = ("ok", worker(rank, seed, dev))
    except Exception:
        result = ("error", traceback.format_exc())
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _layers_on_one_gpu(rank, seed, dev):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(seed)
    full = _full_layer(g, 1024, 512, 16)
    x = _heavy(g, 300, 1024).to(dev, torch.bfloat16)
    full = full.to(dev, torch.bfloat16)
    w, b, a, bb = (t.detach() for t in (full.weight, full.bias, full.lora_A, full.lora_B))
    want = reference.sparse_act_linear(x, w, b, 2, 4, "norm", a, bb, compute_dtype=torch.float32)
    grp = dist.group.WORLD
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = _split_layer(full, parallel.Shard("rowwise", (1024,), grp, rank, 2))
        col = _split_layer(full, parallel.Shard("colwise", (512,), grp, rank, 2))
        got_row = row(row._tp.local(x, -1))
        got_col = col(x)
    return dict(row=_rel(got_row, want), col=_rel(got_col, col._tp.local(want, -1)),
                warnings=sorted({str(w.message)[:200] for w in caught}))


def test_row_and_column_shards_on_one_gpu(tmp_path):
    for r in _run(_layers_on_one_gpu, 2, torch.seed() % 2**31, tmp_path, "gloo"):
        assert r["row"] < BF16_TOL and r["col"] < BF16_TOL, r
        assert not any("reference path" in w for w in r["warnings"]), r  # the lynx kernels ran


def _mid_flux(dev, seed):
    import diffusers
    import torch.distributed as dist

    from rtlynx.integrations.diffusers import example_inputs

    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**MID_FLUX).to(dev, torch.bfloat16).eval()
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, 0)  # rank 0's weights everywhere
    return model, example_inputs(model, height=32, width=32, text_len=128, seed=seed)


def _flux_case(case, dev, seed):
    """One model under one kind of parallelism vs its single-GPU outputs (a fresh model: parallelism is for good)."""
    from diffusers import ContextParallelConfig, TensorParallelConfig

    from rtlynx.integrations.diffusers import output_tensor

    model, inputs = _mid_flux(dev, seed)
    if case == "ring":
        model.set_attention_backend("_native_cudnn")  # native SDPA gives no log-sum-exp for the ring merge
    with torch.no_grad():
        dense = output_tensor(model(**inputs))
    rtlynx.sparsify(model, speed_rules=False)
    with torch.no_grad():
        sparse = output_tensor(model(**inputs))
    cfg = TensorParallelConfig(tp_degree=2) if case == "tp" else ContextParallelConfig(**{f"{case}_degree": 2})
    model.enable_parallelism(config=cfg)
    with torch.no_grad():
        got = output_tensor(model(**inputs))
        with rtlynx.dense_mode(model):
            got_dense = output_tensor(model(**inputs))
    return dict(err=_rel(got, sparse), dense_err=_rel(got_dense, dense), sparse_vs_dense=_rel(sparse, dense),
                rowwise=sum(getattr(l, "_tp", None) is not None and l._tp.style == "rowwise"
                            for l in rtlynx.api.sparse_layers(model).values()))


def _flux_parallel(rank, seed, dev):
    out = {case: _flux_case(case, dev, seed) for case in ("ulysses", "ring", "tp")}
    torch.cuda.empty_cache()
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_flux_context_and_tensor_parallel_on_two_gpus(tmp_path):
    for r in _run(_flux_parallel, 2, torch.seed() % 2**31, tmp_path, "nccl"):
        for case, v in r.items():
            assert v["err"] < MODEL_TOL and v["dense_err"] < MODEL_TOL, (case, v)
            assert v["sparse_vs_dense"] > 1e-3, (case, v)  # the sparse output is not the dense one
        assert r["tp"]["rowwise"] == 4, r  # 2 MLP down + 2 single-block proj_out
