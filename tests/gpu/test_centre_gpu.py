"""Token-mean centring (SparsityConfig.centre) on the lynx kernels: every site of the tiny models against the fp32
centred spec on the inputs it really sees, and the same outputs under torch.compile(fullgraph=True)."""

import pytest
import torch

import rtlynx
from rtlynx import api, sites

from .test_sites_gpu import gen  # noqa: F401  (the fixture: a CUDA generator, its seed printed)
from .test_sm90_kernels import rel_err, rnd

diffusers = pytest.importorskip("diffusers")
from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer  # noqa: E402


@pytest.mark.parametrize("kind", ["flux", "qwen-image", "z-image"])
def test_centred_sites_match_the_spec(kind, gen):
    model = tiny_transformer(kind).cuda().to(torch.bfloat16)
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, lora_rank=8, speed_rules=False, centre="token_mean")
    with torch.no_grad():
        for l in api.sparse_layers(model).values():
            l.lora_B.copy_(rnd(l.lora_B.shape, torch.bfloat16, gen, scale=0.05))
    errs = sites.verify(model, **inputs)
    assert len(errs) == len(sites.model_sites(model)) and max(errs.values()) < 1e-2, errs


@pytest.mark.parametrize("kind", ["flux", "z-image"])
def test_fp8_centred_sites_match_the_spec(kind, gen):
    """dtype="fp8" + centring on the FP8 site kernels against the FP8 centred spec (rtlynx.reference.fp8 with
    ``centre``: c's four FP8 rows in the site GEMM); the sites store FP8 weights only, as uncentred ones do."""
    model = tiny_transformer(kind).cuda().to(torch.bfloat16)
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, lora_rank=8, speed_rules=False, centre="token_mean", dtype="fp8")
    with torch.no_grad():
        for l in api.sparse_layers(model).values():
            l.lora_B.copy_(rnd(l.lora_B.shape, torch.bfloat16, gen, scale=0.05))
    assert all(s._fp8_stored for s in sites.model_sites(model))
    errs = sites.verify(model, **inputs)
    assert len(errs) == len(sites.model_sites(model)) and max(errs.values()) < 2e-2, errs


def test_centred_compiles_fullgraph(gen):
    model = tiny_transformer("flux").cuda().to(torch.bfloat16)
    inputs = example_inputs(model, batch=2)
    rtlynx.sparsify(model, lora_rank=8, speed_rules=False, centre="token_mean")
    with torch.no_grad():
        eager = output_tensor(model(**inputs)).clone()
        compiled = output_tensor(torch.compile(model, fullgraph=True)(**inputs))
    assert torch.isfinite(compiled).all() and rel_err(compiled, eager) < 2e-2
