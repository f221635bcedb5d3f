"""A sparsified model under diffusers' attention dispatcher (issue 19 item 1: backends composed, not rebuilt): the
``attention_backend`` context and ``set_attention_backend`` reach the chosen backend for every attention call, and
the output is the one without them (bit for bit for "native"; the other CPU backends round differently)."""

import pytest
import torch

import rtlynx

pytest.importorskip("diffusers")
from diffusers.models import attention_dispatch as ad  # noqa: E402

from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer  # noqa: E402

CPU_BACKENDS = ("native", "_native_math", "_native_flash", "flex")  # those that run on a CPU


def _counting(monkeypatch, name):
    calls = []
    key = ad.AttentionBackendName(name)
    fn = ad._AttentionBackendRegistry._backends[key]

    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    monkeypatch.setitem(ad._AttentionBackendRegistry._backends, key, counted)
    return calls


@pytest.fixture(scope="module")
def sparse_flux():
    model = tiny_transformer("flux")
    inputs = example_inputs(model, batch=2)
    with torch.no_grad():
        dense = output_tensor(model(**inputs))
    rtlynx.sparsify(model, backend="reference", lora_rank=4, speed_rules=False)
    with torch.no_grad():
        plain = output_tensor(model(**inputs))
    assert not torch.allclose(plain, dense, atol=1e-4)  # the sites run
    return model, inputs, plain


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.no_grad()
def test_context_reaches_the_backend_and_keeps_the_output(sparse_flux, monkeypatch, name):
    model, inputs, plain = sparse_flux
    calls = _counting(monkeypatch, name)
    with ad.attention_backend(name):
        got = output_tensor(model(**inputs))
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert len(calls) == blocks
    if name == "native":
        assert torch.equal(got, plain)
    else:
        torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_set_attention_backend_on_a_sparsified_model(sparse_flux, monkeypatch):
    model, inputs, plain = sparse_flux
    calls = _counting(monkeypatch, "_native_math")
    model.set_attention_backend("_native_math")
    try:
        got = output_tensor(model(**inputs))
    finally:
        model.reset_attention_backend()
    assert calls and torch.allclose(got, plain, rtol=1e-4, atol=1e-5)
