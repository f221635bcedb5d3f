"""The pure-torch specification of rtlynx: every kernel is tested bit for bit (pruning, packing) or
within bf16 tolerance (GEMMs) against these functions. Math lives here and nowhere else.

- ``nm``: N:M masks, pruning, compression to values + metadata ("rows" layout), the norm scale,
  weight-sparsity baselines (magnitude, Wanda) and the full RT-Lynx linear.
- GPU layouts of the compressed operand (for the Hopper kernels) live in sibling modules and are
  registered in ``LAYOUTS`` so tests can ask for any of them by name.
- ``producers``: element-wise ops that compute a layer's input (GELU-tanh of the MLP) which the kernels fuse
  into the prune pass (``PRODUCERS``).
"""

from .nm import (
    SUPPORTED_M,
    centred,
    centre_rows,
    channel_norm,
    check_pattern,
    compress,
    decompress,
    meta_bits,
    meta_bytes_per_row,
    nm_mask,
    norm_scale,
    pad_to_multiple,
    prune_nm,
    prune_weight_magnitude,
    prune_weight_wanda,
    ranking_key,
    row_centres,
    sparse_act_linear,
    token_mean,
    wanda_score,
)

from .producers import PRODUCERS, gelu_tanh  # element-wise producers fused into the prune pass

# name -> function(x, n, m) returning the tensors a kernel emits for that layout.
LAYOUTS = {"rows": compress}
LAYOUTS["sm90"] = __import__(f"{__name__}.sm90", fromlist=["compress_sm90"]).compress_sm90  # Hopper kernels

__all__ = [
    "LAYOUTS", "PRODUCERS", "SUPPORTED_M", "channel_norm", "check_pattern", "compress", "decompress", "gelu_tanh",
    "meta_bits", "meta_bytes_per_row", "nm_mask", "norm_scale", "pad_to_multiple", "prune_nm", "prune_weight_magnitude",
    "prune_weight_wanda", "ranking_key", "row_centres", "sparse_act_linear", "wanda_score",
]
