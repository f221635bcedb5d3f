"""Issue 19's measuring scripts on the CPU (benchmarks/attention.py and benchmarks/stack.py --smoke: their JSON, their
summaries, the skips that say why), the attention shapes against the model classes and the shared shape table, and
`rtlynx generate --compare`'s table of seconds per image on the tiny FLUX pipeline."""

import csv
import inspect
import json
from pathlib import Path

import pytest

from conftest import load_benchmark

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "gemm_shapes" / "target_models.csv"
ISSUE_KEYS = {"forward_vs_recipe", "forward_vs_dense_compiled", "pipeline_vs_recipe",
              "pipeline_cached_vs_recipe_cached", "fp8_linear_vs_bf16_large", "fp8_linear_vs_fp8_dense_large"}


def test_attention_smoke_writes_rows_and_summary(tmp_path):
    att = load_benchmark("attention")
    out = tmp_path / "att.json"
    assert att.main(["--smoke", "--out", str(out), "--backends", "native", "_native_math", "flash"]) == 0
    doc = json.loads(out.read_text())
    rows = {r["backend"]: r for r in doc["rows"]}
    assert doc["device"] == "cpu" and doc["commit"] and doc["versions"]["torch"]
    assert rows["native"]["vs_native"] == 1.0 and rows["native"]["rel_err"] < 1e-5 and rows["native"]["tflops"] > 0
    assert "flash-attn" in rows["flash"]["skipped"]  # not installed here: skipped, saying why
    assert doc["summary"]["fastest"]["tiny"]["backend"] in ("native", "_native_math")


def test_attention_shapes_are_the_models():
    att = load_benchmark("attention")
    classes = {"flux": ("FluxTransformer2DModel", "num_attention_heads", "attention_head_dim"),
               "qwen-image": ("QwenImageTransformer2DModel", "num_attention_heads", "attention_head_dim"),
               "z-image": ("ZImageTransformer2DModel", "n_heads", None)}
    for key, (cls, heads, head_dim) in classes.items():
        d = {k: v.default for k, v in inspect.signature(getattr(diffusers, cls).__init__).parameters.items()}
        assert att.SHAPES[key]["heads"] == d[heads]
        assert att.SHAPES[key]["head_dim"] == (d[head_dim] if head_dim else d["dim"] // d["n_heads"])
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} not here (the shared folder beside the checkout)")
    rows = list(csv.DictReader(SHARED.open()))

    def m(model, pattern):
        return [int(r["M"]) for r in rows if r["model"] == f"{model} @ 1024x1024" and r["module_pattern"] == pattern]

    flux_joint = m("FLUX.1-dev", "transformer_blocks.*.attn.to_q")[0] + \
        m("FLUX.1-dev", "transformer_blocks.*.attn.add_q_proj")[0]
    assert att.SHAPES["flux"]["seq"] == flux_joint == m("FLUX.1-dev", "single_transformer_blocks.*.attn.to_q")[0]
    assert att.SHAPES["qwen-image"]["seq"] == m("Qwen-Image", "transformer_blocks.*.attn.to_q")[0] + \
        m("Qwen-Image", "transformer_blocks.*.attn.add_q_proj")[0]
    assert att.SHAPES["z-image"]["seq"] == m("Z-Image-Turbo", "layers.*.attention.to_q")[0]


@pytest.mark.slow
def test_stack_smoke_rows_ratios_and_issue_keys(tmp_path):
    stack = load_benchmark("stack")
    out = tmp_path / "stack.json"
    assert stack.main(["--smoke", "--variants", "dense compiled", "recipe", "rtlynx fp8 + cache", "rtlynx fp8 t<0.2",
                       "--reps", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert list(rows) == ["dense", "dense compiled", "recipe", "rtlynx fp8 + cache", "rtlynx fp8 t<0.2"]  # dense first
    # cache-dit on top runs, and is taken off again for the next variant
    assert "error" not in rows["rtlynx fp8 + cache"] and rows["rtlynx fp8 + cache"]["s_per_image"] > 0
    assert doc["device"] == "cpu" and doc["commit"] and doc["steps"] == 4
    # the default cache mask (cache-dit's "medium" for 4 steps: 1101) cached exactly its masked step
    import cache_dit
    assert doc["cache_mask"] == "medium"
    assert rows["rtlynx fp8 + cache"]["cached_steps"] == cache_dit.steps_mask(mask_policy="medium", total_steps=4).count(0) == 1
    for name in ("dense", "dense compiled", "rtlynx fp8 t<0.2"):  # rtlynx fp8 t<0.2 runs after the cached variant
        assert rows[name]["s_per_image"] > 0 and rows[name]["forward_ms"] > 0 and rows[name]["reps"] == 1, rows[name]
    assert rows["dense"]["vs_dense"] == 1.0 and "vs_dense_compiled" in rows["rtlynx fp8 t<0.2"]
    if stack.torchao_status():
        assert "torchao" in rows["recipe"]["skipped"]
    assert ISSUE_KEYS <= set(doc["summary"]) and doc["summary"]["summary_variant"] == "rtlynx fp8 t<0.2"
    assert doc["summary"]["forward_vs_dense_compiled"] is not None and doc["summary"]["pipeline_vs_recipe"] is None


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen-image", "z-image"])
def test_stack_smoke_other_pipelines(tmp_path, model):
    """--model qwen-image / z-image: the tiny pipeline of that kind, its rows, one transformer call a step counted."""
    stack = load_benchmark("stack")
    out = tmp_path / "stack.json"
    assert stack.main(["--smoke", "--model", model, "--variants", "dense", "rtlynx bf16", "--reps", "1",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert doc["pipeline"] == f"tiny {stack.MODEL_NAMES[model]}" and doc["steps"] == 4
    for r in rows.values():
        assert "error" not in r and r["s_per_image"] > 0 and r["calls_per_step"] == 1.0, r


def test_stack_time_budget_skips_what_does_not_fit(tmp_path):
    stack = load_benchmark("stack")
    out = tmp_path / "stack.json"
    args = ["--smoke", "--variants", "dense", "rtlynx bf16", "--time-budget", "0.001", "--reps", "1"]
    assert stack.main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert "s_per_image" in rows[0] and rows[1]["skipped"].startswith("time budget")


@pytest.mark.slow
def test_generate_compare_prints_seconds_per_image(tmp_path, capsys):
    from rtlynx.cli import main
    from rtlynx.testing import SIZE, save_tiny_pipeline

    model = save_tiny_pipeline("flux", tmp_path / "flux")
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(model), "--prompt", "a red cat", "--prompt", "a blue dog", "--steps", "2",
                 "--height", str(SIZE), "--width", str(SIZE), "--device", "cpu", "--compare", "--reps", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "s/image" in text and "PSNR vs dense" in text and "median of 2 run(s)" in text
    timing = json.loads((out / "generate.json").read_text())["timing"]
    for side in ("lynx", "dense"):
        assert len(timing[side]["reps"]) == 2 and len(timing[side]["steps_s"]) == 2
        assert timing[side]["s_per_image"] == pytest.approx(timing[side]["total_s"] / 2)
    assert len(timing["psnr_vs_dense"]) == 2 and timing["compile"] == "none"


@pytest.mark.slow
def test_quality_attention_backend_rows(tmp_path):
    """benchmarks/quality.py --attention: every variant on that backend, a dense SDPA run first, every row paired
    against it; on the CPU the math kernel equals SDPA's choice there to fp32 rounding (a PSNR far above any 2:4
    error), while RT-Lynx's own distance to the SDPA dense run is its sparsity error (equal to its psnr column)."""
    quality = load_benchmark("quality")
    out = tmp_path / "q.json"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red apple\na blue car\n")
    assert quality.main(["--device", "cpu", "--n", "2", "--batch-size", "2", "--steps", "2", "--dtype", "fp32",
                         "--variants", "dense", "rtlynx", "--attention", "_native_math", "--inception", "/nonexistent",
                         "--data", "none", "--prompts-file", str(prompts), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["variants"]
    assert doc["attention"] == "_native_math" and list(rows) == ["dense_sdpa", "dense", "rtlynx"]
    assert rows["dense"]["psnr_vs_sdpa"] is None or rows["dense"]["psnr_vs_sdpa"] > 80
    assert rows["rtlynx"]["psnr_vs_sdpa"] < 40
    assert abs(rows["rtlynx"]["psnr_vs_sdpa"] - rows["rtlynx"]["psnr"]) < 0.1


def test_stack_real_pipelines_have_the_published_sizes():
    """The real-size Qwen-Image and Z-Image pipelines of benchmarks/stack.py, built on the meta device: parameter
    counts of the published models (Qwen2.5-VL-7B-Instruct 8.29B, Qwen3-4B 4.02B, the transformers 20.4B and 6.15B)
    and the pipelines' own default steps."""
    import torch

    stack = load_benchmark("stack")
    want = {"qwen-image": {"text_encoder": 8.29, "transformer": 20.43}, "z-image": {"text_encoder": 4.02,
                                                                                   "transformer": 6.15}}
    for kind, sizes in want.items():
        pipe = stack.PIPELINES[kind]("meta")
        for name, billions in sizes.items():
            got = sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e9
            assert abs(got - billions) < 0.01, (kind, name, got)
        assert stack.default_steps(pipe) == 50 and next(pipe.transformer.parameters()).dtype == torch.bfloat16
