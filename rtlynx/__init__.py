"""rtlynx: online N:M activation sparsity for Diffusion Transformers (RT-Lynx).

    import rtlynx
    rtlynx.sparsify(transformer)                 # 2:4 on the paper's layers, norm compensation
    rtlynx.save(transformer, "lynx/")            # config + LoRA only, never the base weights

Map, bottom layer first (tests/test_imports.py enforces it): reference/ the pure-torch spec; config, presets;
ops/ the CUDA ops (csrc/ sources); families.py one kernel family per dtype: where FP8 differs from bf16;
backends.py per-layer kernels (lynx, cuSPARSELt, reference); sites/ grouping, shared outputs (core), the operand
and its storage formats (operand.py: where the LoRA tail is built, layout in reference/sm90.expand_lora_b),
tensor-parallel shards; nn.py SparseActLinear; integrations/diffusers.py the diffusers glue; api.py the verbs;
then distill, select, parallel, io, pipelines; commands/ the CLI.
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
