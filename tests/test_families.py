"""The per-layer backends each kernel family has (rtlynx.families, rtlynx.backends): on the CPU both families land on
their spec, bit for bit, whatever backend the layer asked for."""

import warnings

import pytest
import torch

from rtlynx import backends, reference
from rtlynx.families import FAMILIES
from rtlynx.reference.fp8 import fp8_sparse_act_linear


def _args(seed=0, lora=True):
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(7, 64, generator=g), torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
    a, bb = (torch.randn(4, 64, generator=g), torch.randn(24, 4, generator=g)) if lora else (None, None)
    return x, w, b, 2, 4, "norm", a, bb, 1e-8


@pytest.mark.parametrize("backend", ["auto", "reference", "lynx", "cusparselt"])
@pytest.mark.parametrize("dtype,spec", [("native", reference.sparse_act_linear), ("fp8", fp8_sparse_act_linear)])
def test_family_runs_its_spec_on_the_cpu(backend, dtype, spec):
    args = _args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = FAMILIES[dtype].run_backend(backend, *args)
    assert torch.equal(y, spec(*args))
    # "auto" on the CPU goes straight to the reference; a backend asked for by name warns that it cannot run
    assert bool(caught) == (backend in ("lynx", "cusparselt"))


def test_bf16_and_fp8_backends():
    assert set(FAMILIES["native"].layer_backends) == {"lynx", "cusparselt", "reference"}
    assert set(FAMILIES["fp8"].layer_backends) == {"reference"}
    assert backends.FALLBACK == {"auto": "lynx", "lynx": "cusparselt", "cusparselt": "reference", "reference": None}
    with pytest.raises(RuntimeError, match="no rtlynx backend"):  # a family without a reference runs nothing
        backends.run("lynx", *_args(), backends={})
