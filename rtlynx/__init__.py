"""rtlynx: online N:M activation sparsity for Diffusion Transformers (RT-Lynx).

    import rtlynx
    rtlynx.sparsify(transformer)                 # 2:4 on the paper's layers, norm compensation
    rtlynx.save(transformer, "lynx/")            # config + LoRA only, never the base weights

Map, bottom layer first (tests/test_imports.py enforces it): reference/ the pure-torch spec; config, presets;
ops/ the CUDA ops (csrc/ sources); families.py one kernel family per dtype: where FP8 differs from bf16;
backends.py per-layer kernels (lynx, cuSPARSELt, reference); sites/ grouping, shared outputs (core), the operand
and its storage formats (operand.py: where the LoRA tail is built, layout in reference/sm90.expand_lora_b), the
user's PEFT adapters in that tail (adapters.py), tensor-parallel shards; nn.py SparseActLinear; integrations/diffusers.py the diffusers glue; api.py the verbs;
then distill, select, parallel, io, pipelines; commands/ the CLI.
"""

from ._version import __version__
import importlib

# Loaded on first use (PEP 562): `rtlynx --help` and the CLI's argument checks must not wait for torch.
_EXPORTS = {
    "config_of": "api", "configure": "api", "dense_mode": "api", "eligible_layers": "api", "sparse_layers": "api",
    "sparsify": "api", "summary": "api", "unsparsify": "api", "SparsityConfig": "config", "load": "io",
    "save": "io", "SparseActLinear": "nn",
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # rtlynx.io, rtlynx.sites, ...: loaded eagerly before issue 22, on first use now
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'rtlynx' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_EXPORTS})



__all__ = [
    "SparseActLinear", "SparsityConfig", "config_of", "configure", "dense_mode", "eligible_layers", "load", "save",
    "sparse_layers", "sparsify", "summary", "unsparsify",
]
