"""rtlynx under cache-dit's DBCache (issue 19 item 4: caching stacked on top): both orders compose, caching really
skips work on the sparse model, and with the sparse layers dense the cached sparsified pipeline is the cached dense
pipeline bit for bit (the same cache decisions, so the step gate and the layers are the only difference)."""

import copy

import pytest
import torch

import rtlynx

cache_dit = pytest.importorskip("cache_dit")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from rtlynx.testing import BUILDERS, PROMPTS, SIZE  # noqa: E402

STEPS = 12


def _config():
    # the tiny FLUX has 2 double blocks: cache-dit's default (8 front blocks always computed) needs 8
    return cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2,
                                   residual_diff_threshold=0.5)


def _gen(pipe):
    return pipe(PROMPTS[:2], height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def _counting(pipe):
    calls = []
    for layer in rtlynx.sparse_layers(pipe.transformer).values():
        layer.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


@pytest.fixture(scope="module")
def pipes():
    torch.manual_seed(0)
    dense = BUILDERS["flux"]()
    return dense, copy.deepcopy(dense)


@pytest.mark.parametrize("order", ["sparsify_first", "cache_first"])
def test_cache_dit_composes_with_sparse_layers(pipes, order):
    dense, fresh = pipes
    dense, sp = copy.deepcopy(dense), copy.deepcopy(fresh)
    kw = dict(backend="reference", speed_rules=False, lora_rank=4)
    uncached_sp = copy.deepcopy(sp)
    rtlynx.sparsify(uncached_sp.transformer, **kw)
    calls_uncached = _counting(uncached_sp)
    want_uncached = _gen(uncached_sp)

    cache_dit.enable_cache(dense, cache_config=_config())
    cached_dense = _gen(dense)
    cached_steps = cache_dit.summary(dense)[0].cached_steps
    assert 0 < len(cached_steps) < STEPS  # the cache really skips steps on this setting

    if order == "sparsify_first":
        rtlynx.sparsify(sp.transformer, **kw)
        cache_dit.enable_cache(sp, cache_config=_config())
    else:
        cache_dit.enable_cache(sp, cache_config=_config())
        rtlynx.sparsify(sp.transformer, **kw)
    with torch.no_grad():  # the same LoRA factors as the uncached copy
        for a, b in zip(rtlynx.sparse_layers(uncached_sp.transformer).values(),
                        rtlynx.sparse_layers(sp.transformer).values()):
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B)
    calls = _counting(sp)
    with rtlynx.dense_mode(sp.transformer):
        assert torch.equal(_gen(sp), cached_dense)  # same cache decisions, dense layers: bit for bit
    calls.clear()
    got = _gen(sp)
    assert torch.isfinite(got).all() and not torch.equal(got, cached_dense)  # the sparse layers ran
    assert 0 < len(calls) < len(calls_uncached)  # cached steps skip most sparse-layer calls
    # the cache's own error on the sparse model is of the size it has on the dense one
    err_cache_sparse = (got - want_uncached).abs().mean()
    assert err_cache_sparse < 5 * (cached_dense - _uncached_dense(fresh)).abs().mean() + 1e-3


def _uncached_dense(fresh):
    return _gen(copy.deepcopy(fresh))


def test_step_gate_under_cache_dit(pipes):
    # dense_below_t under the cache: every sparse-layer call of a step with noise level t < 0.5 runs dense, the
    # others sparse (t read here from the pipeline's own transformer call)
    sp = copy.deepcopy(pipes[1])
    rtlynx.sparsify(sp.transformer, backend="reference", speed_rules=False, lora_rank=4, dense_below_t=0.5)
    cache_dit.enable_cache(sp, cache_config=_config())
    t_now, seen = [], []
    sp.transformer.register_forward_pre_hook(lambda m, a, kw: t_now.append(float(kw["timestep"].flatten()[0])),
                                             with_kwargs=True)
    for layer in rtlynx.sparse_layers(sp.transformer).values():
        layer.register_forward_pre_hook(lambda m, a: seen.append((t_now[-1], m._step_gate.dense)))
    _gen(sp)
    assert len(t_now) == STEPS and seen
    assert all(dense == (t < 0.5) for t, dense in seen), seen
    assert {dense for _, dense in seen} == {True, False}
