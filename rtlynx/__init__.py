"""rtlynx: online N:M activation sparsity for Diffusion Transformers (RT-Lynx).

    import rtlynx
    rtlynx.sparsify(transformer)                 # 2:4 on the paper's layers, norm compensation
    print(rtlynx.summary(transformer))
    rtlynx.save(transformer, "lynx/")            # config + LoRA only, never the base weights
"""

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


__version__ = "0.1.0"

__all__ = [
    "SparseActLinear", "SparsityConfig", "config_of", "configure", "dense_mode", "eligible_layers", "load", "save",
    "sparse_layers", "sparsify", "summary", "unsparsify",
]
