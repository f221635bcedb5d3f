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


def test_e2e_smoke_regional_compile_has_its_own_rows(tmp_path):
    """--compile --regional (diffusers' compile_repeated_blocks, dynamo's eager backend in --smoke): rows of mode
    compiled-regional, the summary's compiled_regional ratio, the model uncompiled after each variant."""
    e2e = load_benchmark("e2e")
    out = tmp_path / "e2e.json"
    assert e2e.main(["--smoke", "--models", "flux", "--variants", "rtlynx", "--compile", "--regional",
                     "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {(r["variant"], r["mode"]) for r in doc["rows"]} == {("dense", "compiled-regional"),
                                                                 ("rtlynx", "compiled-regional")}
    assert doc["summary"]["flux"]["compiled_regional"] > 0 and doc["summary"]["flux"]["compiled"] is None
    with pytest.raises(SystemExit, match="--regional is a kind of --compile"):
        e2e.main(["--smoke", "--models", "flux", "--regional", "--out", str(out)])


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


def test_fp8_results_summary(tmp_path):
    """benchmarks/fp8.py save(): the e2e ratios from the rows, the FID ratios from the quality files beside it, and
    summary_pending entries dropped once measured."""
    fp8 = load_benchmark("fp8")
    (tmp_path / "quality_fp8.json").write_text(json.dumps({"summary": {"fid_fp8_over_bf16_rtlynx": 1.25}}))
    rows = [{"variant": "dense", "ms": 10.0, "vs_dense": 1.0}, {"variant": "fp8 recipe", "ms": 8.0, "vs_dense": 1.25},
            {"variant": "rtlynx fp8", "ms": 5.0, "vs_dense": 2.0, "vs_fp8_recipe": 1.6}]
    data = {"e2e_runs": [{"rows": rows}], "summary_pending": {"fid_fp8_over_bf16_rtlynx": "not yet", "other": "x"}}
    out = tmp_path / "fp8.json"
    fp8.save(out, data)
    got = json.loads(out.read_text())
    assert got["summary"]["fid_fp8_over_bf16_rtlynx"] == 1.25
    assert "fid_fp8_over_bf16_rtlynx_dense_below_t0.2" not in got["summary"]  # no such file
    assert got["summary"]["e2e_flux_compiled_vs_bf16"] == 2.0 and got["summary"]["e2e_flux_compiled_vs_fp8_recipe"] == 1.6
    assert got["summary_pending"] == {"other": "x"}


@pytest.mark.slow
def test_user_lora_smoke_writes_the_summary(tmp_path):
    """benchmarks/user_lora.py --smoke (tiny FLUX, CPU, dynamo's eager backend): rows, identity and summary keys."""
    bench = load_benchmark("user_lora")
    out = tmp_path / "user_lora.json"
    assert bench.main(["--smoke", "--reps", "1", "--variants", "rtlynx bf16 + LoRA r16", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["commit"] and "kernel_library" in doc
    (row,) = doc["rows"]
    assert row["variant"] == "rtlynx bf16 + LoRA r16" and row["ms"] > 0 and row["adapter_layers_in_tail"] > 0
    assert row["commit"] == doc["commit"] and row["mode"] == "default"
    with pytest.raises(SystemExit, match="mode default"):  # one compile mode per file: the ratios compare rows
        bench.main(["--smoke", "--reps", "1", "--mode", "reduce-overhead", "--variants", "dense", "--out", str(out)])
    s = doc["summary"]
    assert set(s) >= {"adapter_cost_bf16", "adapter_cost_fp8", "recompiles_on_hotswap"}
    assert s["adapter_cost_bf16"] is None and s["recompiles_on_hotswap"] == 0  # no row without the adapter yet
    assert bench.device_tag("NVIDIA H100 80GB HBM3") == "h100" and bench.device_tag("NVIDIA H200") == "h200"
