"""Where the CUDA sources are, and the GEMM config names that csrc/gen_configs.py generated (csrc/configs.json):
one list, written with the .cu files, read here (tests/test_configs.py checks they agree)."""

from __future__ import annotations

import json
from pathlib import Path

# In a source checkout csrc/ sits at the repository root; wheels carry it as rtlynx/csrc (a symlink
# to ../csrc in the checkout, whose files setuptools copies into the package).
CSRC = Path(__file__).resolve().parents[1] / "csrc"
if not CSRC.is_dir():
    CSRC = Path(__file__).resolve().parents[2] / "csrc"

_NAMES = json.loads((CSRC / "configs.json").read_text())
BF16_CONFIG_NAMES: tuple[str, ...] = tuple(_NAMES["bf16"])  # config id = position (csrc/sparse_gemm_sm90_dispatch.cu)
FP8_CONFIG_NAMES: tuple[str, ...] = tuple(_NAMES["fp8"])    # (csrc/sparse_gemm_fp8_sm90_dispatch.cu)
