"""rtlynx: online N:M activation sparsity for Diffusion Transformers (RT-Lynx).

    import rtlynx
    rtlynx.sparsify(transformer)                 # 2:4 on the paper's layers, norm compensation
    print(rtlynx.summary(transformer))
    rtlynx.save(transformer, "lynx/")            # config + LoRA only, never the base weights
"""

from ._version import __version__
from .api import config_of, configure, dense_mode, eligible_layers, sparse_layers, sparsify, summary, unsparsify
from .config import SparsityConfig
from .io import load, save
from .nn import SparseActLinear


__all__ = [
    "SparseActLinear", "SparsityConfig", "config_of", "configure", "dense_mode", "eligible_layers", "load", "save",
    "sparse_layers", "sparsify", "summary", "unsparsify",
]
