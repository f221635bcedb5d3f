"""The GEMM configs have one source, csrc/gen_configs.py: the names Python reads (csrc/configs.json), the dispatch
tables and the per-config .cu files it generated must all say the same (CPU only: nothing is compiled)."""

from __future__ import annotations

import importlib.util
import json
import re

from rtlynx.ops import _configs
from rtlynx.ops import fp8 as kf8
from rtlynx.ops import sm90 as k90

CSRC = _configs.CSRC


def _gen():
    spec = importlib.util.spec_from_file_location("gen_configs", CSRC / "gen_configs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_python_reads_what_gen_configs_writes():
    gen = _gen()
    bf16, fp8 = [c[0] for c in gen.CONFIGS], [c[0] for c in gen.FP8_CONFIGS]
    assert json.loads((CSRC / "configs.json").read_text()) == {"bf16": bf16, "fp8": fp8}  # rerun gen_configs.py
    assert list(k90.CONFIG_NAMES) == bf16 and list(kf8.CONFIG_NAMES) == fp8
    assert {c[0]: c[3] for c in gen.FP8_CONFIGS} == kf8.TILE_K


def test_generated_sources_list_the_same_configs():
    gen = _gen()
    for configs, prefix, dispatch in ((gen.CONFIGS, "sparse_gemm_sm90_", "sparse_gemm_sm90_dispatch.cu"),
                                      (gen.FP8_CONFIGS, "sparse_gemm_fp8_sm90_", "sparse_gemm_fp8_sm90_dispatch.cu")):
        names = [c[0] for c in configs]
        table = re.findall(r'\{"([^"]+)",', (CSRC / dispatch).read_text())
        assert table == names, dispatch
        for n in names:
            assert (CSRC / f"{prefix}{n}.cu").is_file(), n


def test_tuned_tables_name_compiled_configs():
    assert {name for name, _ in k90.CONFIG_TABLE.values()} <= set(k90.CONFIG_NAMES)
    assert {name for name, _ in kf8.CONFIG_TABLE.values()} <= set(kf8.CONFIG_NAMES)
