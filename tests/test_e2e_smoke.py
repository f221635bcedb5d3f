"""benchmarks/e2e.py on the CPU (--smoke: tiny configs, reference backend): the script, its JSON and its summary."""

import json

import pytest

from conftest import load_benchmark

pytest.importorskip("diffusers")


def test_e2e_smoke_writes_rows_and_summary(tmp_path):
    e2e = load_benchmark("e2e")
    out = tmp_path / "e2e.json"
    assert e2e.main(["--smoke", "--models", "flux", "--variants", "rtlynx", "rtlynx + LoRA r64", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and {r["variant"] for r in doc["rows"]} == {"dense", "rtlynx", "rtlynx + LoRA r64"}
    assert len(doc["source_digest"]) == 16 and doc["commit"]
    assert set(doc["summary"]["flux"]) >= {"eager", "compiled", "eager_lora", "peak_mem_ratio_lora"}
    assert doc["summary"]["flux"]["compiled"] is None  # no compiled row yet
    # a second run in another mode merges into the same file instead of replacing it
    assert e2e.main(["--smoke", "--models", "flux", "--variants", "rtlynx", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["rows"]) == 3


def test_kernel_classes():
    e2e = load_benchmark("e2e")
    assert e2e.kernel_class("void (anonymous namespace)::prune_compress_kernel<__nv_bfloat16, 32>") == \
        "prune / producer passes"
    assert e2e.kernel_class("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalI"
                            "MainloopSm90TmaGmmaWarpSpecializedSparse") == "sparse GEMMs"
    assert e2e.kernel_class("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "dense GEMMs"
    assert e2e.kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert e2e.kernel_class("void at::native::vectorized_layer_norm_kernel") == "rest"
    assert e2e.kernel_class("void (anonymous namespace)::prune_quant_fp8_kernel<__nv_bfloat16, 32, 8, 1>") == \
        "prune / producer passes"
    assert e2e.kernel_class("triton_poi_fused__to_copy_abs_amax_clamp_0") == "triton (inductor)"
