"""The real-model workflow on tiny random pipelines of the three families saved to disk (tests/tiny_pipelines.py):
calibrate -> train-lora -> save -> load -> generate, select, the memory plan, and the bad inputs."""

import json

import pytest
import torch

import rtlynx
from rtlynx import distill, reference
from rtlynx.cli import main

pytest.importorskip("transformers")
from conftest import load_benchmark  # noqa: E402
from tiny_pipelines import PROMPTS, SIZE, save_tiny_pipeline  # noqa: E402

KINDS = ("flux", "qwen-image", "z-image")
SAMPLE = ["--steps", "2", "--height", str(SIZE), "--width", str(SIZE), "--device", "cpu"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    return {k: save_tiny_pipeline(k, root / k, seed=0) for k in KINDS} | {"prompts": prompts}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_calibrate_train_generate(pipes, kind, tmp_path):
    calib, lynx, out = tmp_path / "calib.safetensors", tmp_path / "lynx", tmp_path / "gen"
    model = ["--model", str(pipes[kind])]
    assert main(["calibrate", *model, "--prompts", str(pipes["prompts"]), "--num-prompts", "2", "--batch-size", "2",
                 *SAMPLE, "--out", str(calib)]) == 0
    stats = distill.CalibStats.load(calib)
    assert stats.meta["prompts_done"] == 2 and all(s.rows > 0 for s in stats.layers.values())
    assert main(["train-lora", *model, "--calib", str(calib), "--rank", "2", "--device", "cpu", "--out", str(lynx)]) == 0
    report = json.loads((lynx / "distill_report.json").read_text())
    assert all(r["err_lora"] <= r["err_norm"] + 1e-9 for r in report["layers"])
    assert main(["generate", *model, "--lynx", str(lynx), "--prompt", "a red cat", *SAMPLE, "--compare",
                 "--out", str(out)]) == 0
    result = json.loads((out / "generate.json").read_text())
    assert len(result["timing"]["lynx"]["steps_s"]) == 2 and len(result["timing"]["dense"]["steps_s"]) == 2
    assert 0 < result["timing"]["psnr_vs_dense"][0] <= float("inf")
    assert result["settings"]["sparse_layers"] == len(report["layers"])
    assert (out / "lynx_0.png").read_bytes()[:4] == b"\x89PNG" and (out / "dense_0.png").is_file()
    # The saved LoRA is what the loaded model carries.
    from rtlynx.pipelines import load_transformer
    from safetensors.torch import load_file

    fresh = load_transformer(pipes[kind], device="cpu")
    rtlynx.load(fresh, lynx)
    saved = load_file(str(lynx / rtlynx.io.LORA_FILE))
    for name, layer in rtlynx.sparse_layers(fresh).items():
        assert torch.equal(layer.lora_A.detach(), saved[f"{name}.lora_A"])


def _captured_inputs(transformer, run):
    seen = {}
    hooks = [l.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0].reshape(-1, m.in_features)))
             for n, l in rtlynx.sparse_layers(transformer).items()]
    with rtlynx.dense_mode(transformer), torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_collect_is_exact_with_shared_grams(tmp_path):
    from rtlynx.integrations.diffusers import example_inputs, tiny_transformer

    torch.manual_seed(0)  # seed logged by being fixed
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, preset="flux-all")
    inputs = [example_inputs(model, height=4, width=4, seed=1)]

    def run():
        for kw in inputs:
            model(**kw)

    stats = distill.collect(model, run)
    xs = _captured_inputs(model, run)
    q = stats.layers["transformer_blocks.0.attn.to_q"]
    assert q.xtx is stats.layers["transformer_blocks.0.attn.to_k"].xtx  # one Gram per site
    for name, layer in rtlynx.sparse_layers(model).items():
        x = xs[name].double()
        w = layer.weight.detach().double()
        xp = reference.prune_nm(x) * reference.norm_scale(x).double()[:, None]
        r = x @ w.T - xp @ w.T
        s = stats.layers[name]
        assert s.rows == x.shape[0]
        torch.testing.assert_close(s.xtx.double(), x.T @ x, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(s.xtr.double(), x.T @ r, rtol=1e-4, atol=1e-3)
        assert s.yy == pytest.approx(float((x @ w.T).pow(2).sum()), rel=1e-4)
    # the file holds each shared Gram once and restores the sharing
    path = stats.save(tmp_path / "s.safetensors")
    back = distill.CalibStats.load(path)
    assert back.layers["transformer_blocks.0.attn.to_q"].xtx is back.layers["transformer_blocks.0.attn.to_v"].xtx


def test_memory_plan_passes():
    from rtlynx.integrations.diffusers import tiny_transformer

    model = tiny_transformer("flux")
    rtlynx.sparsify(model, preset="flux-all")
    one = distill.plan(model)
    # brute force: 4 bytes x K x (K + sum of the members' N) per site
    sites = rtlynx.sites.model_sites(model)
    assert one.total_bytes == sum(4 * s.k * (s.k + s.n) for s in sites) and len(one.passes) == 1
    budget = max(4 * s.k * (s.k + s.n) for s in sites) * 2.5
    many = distill.plan(model, budget / distill.GB)
    assert len(many.passes) > 1 and all(b <= budget for b in many.pass_bytes())
    assert many.total_bytes == one.total_bytes
    assert sorted(n for p in many.passes for g in p for n in g.layers) == sorted(rtlynx.sparse_layers(model))
    assert "pass 2" in many.report()


def test_fit_lora_streams_one_site_at_a_time(tmp_path, monkeypatch):
    """fit_lora from a pass directory holds one site's statistics at a time (freed by reference counting before
    the next is read) and gives the LoRA of the fit from all statistics in memory."""
    import copy
    import weakref

    from rtlynx.integrations.diffusers import example_inputs, tiny_transformer
    from rtlynx.select import layer_costs

    torch.manual_seed(0)  # seed logged by being fixed
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, preset="flux-all")
    stats = distill.collect(model, lambda: model(**example_inputs(model, height=4, width=4, seed=1)))
    val = distill.collect(model, lambda: model(**example_inputs(model, height=4, width=4, seed=2)))
    plan = distill.plan(model, max(g.nbytes() for g in distill.stat_groups(model)) * 2.5 / distill.GB)
    assert len(plan.passes) > 1
    split = tmp_path / "split"
    for i, groups in enumerate(plan.passes):
        distill.CalibStats({n: stats.layers[n] for g in groups for n in g.layers}, {"preset": "flux-all"}).save(
            split / f"pass-{i + 1:03d}.safetensors")
    val.save(tmp_path / "val.safetensors")

    reads, live = [], []
    real_read = distill.StatsFiles.read

    def read(self, names=None, device="cpu"):
        if self.path.name != "val.safetensors":  # a new site (its validation statistics come after it)
            assert all(r() is None for r in live), "a site's statistics were still held when the next was read"
            reads.append(list(names))
        out = real_read(self, names, device)
        live.extend(weakref.ref(t) for s in out.layers.values() for t in (s.xtx, s.xtr))
        return out

    monkeypatch.setattr(distill.StatsFiles, "read", read)
    ref = copy.deepcopy(model)
    ref_rows = distill.fit_lora(ref, stats, rank=3, val=val, progress=False)  # all in memory
    streamed = copy.deepcopy(model)
    rows = distill.fit_lora(streamed, split, rank=3, val=tmp_path / "val.safetensors", progress=False)
    assert [sorted(r) for r in reads] == [sorted(g.layers) for p in plan.passes for g in p]  # site by site
    assert [r["layer"] for r in rows] == [r["layer"] for r in ref_rows] == list(rtlynx.sparse_layers(model))
    for a, b in zip(rows, ref_rows):
        assert a.keys() == b.keys()
        for k in ("err_norm", "err_lora", "val_err_norm", "val_err_lora"):
            assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12)
    got, want = rtlynx.sparse_layers(streamed), rtlynx.sparse_layers(ref)
    for name in want:
        torch.testing.assert_close(got[name].lora_A, want[name].lora_A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[name].lora_B, want[name].lora_B, rtol=1e-6, atol=1e-7)
    # select's quality costs stream the same way: the squared errors of the LoRA fit
    reads.clear()
    costs = layer_costs(split, rank=3)
    assert len(reads) == sum(len(p) for p in plan.passes)
    assert costs == pytest.approx({r["layer"]: r["err_lora"] ** 2 for r in ref_rows}, rel=1e-9, abs=1e-15)
    # rank "fill": each layer at 64 // the members of its site, the sites counted on the model, not on the statistics
    from rtlynx.sites import model_sites
    members = {id(l): len(s.layers) for s in model_sites(model) for l in s.layers}
    fill = layer_costs(split, rank="fill")
    want_fill = {n: distill.residual_error(stats.layers[n], *distill.solve_lora(stats.layers[n], 64 // members[id(l)]))
                 ** 2 for n, l in rtlynx.sparse_layers(model).items()}
    assert fill == pytest.approx(want_fill, rel=1e-9, abs=1e-15)
    assert all(fill[n] <= costs[n] * (1 + 1e-9) + 1e-15 for n in costs)  # every fill rank is >= 3 here
    assert distill.StatsFiles(split).meta["preset"] == "flux-all"  # settings the passes share
    assert len(distill.StatsFiles(split).meta["passes"]) == len(plan.passes)


def test_stats_files_bad_inputs(tmp_path):
    from rtlynx.integrations.diffusers import example_inputs, tiny_transformer

    model = tiny_transformer("flux")
    rtlynx.sparsify(model, preset="flux-all")
    stats = distill.collect(model, lambda: model(**example_inputs(model, height=4, width=4, seed=1)))
    d = tmp_path / "d"
    stats.save(d / "pass-001.safetensors")
    stats.save(d / "pass-002.safetensors")
    with pytest.raises(ValueError, match="also in"):  # a layer in two passes: two calibrations mixed
        distill.StatsFiles(d)
    (tmp_path / "junk.safetensors").write_bytes(b"12345678garbage")
    with pytest.raises(ValueError, match="junk.safetensors"):
        distill.StatsFiles(tmp_path / "junk.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no calibration passes"):
        distill.StatsFiles(tmp_path / "empty")
    # a layer missing from the statistics stops before any layer gets a LoRA
    part = distill.CalibStats(dict(list(stats.layers.items())[:3])).save(tmp_path / "part.safetensors")
    with pytest.raises(ValueError, match="no calibration statistics"):
        distill.fit_lora(model, part, rank=2, progress=False)
    assert all(l.lora_rank == 0 for l in rtlynx.sparse_layers(model).values())


@pytest.mark.slow
def test_passes_and_resume_equal_one_run(pipes, tmp_path):
    from safetensors.torch import load_file

    common = ["--model", str(pipes["flux"]), "--prompts", str(pipes["prompts"]), "--num-prompts", "2",
              "--batch-size", "1", *SAMPLE, "--preset", "flux-all"]
    whole, split, resumed = tmp_path / "whole.st", tmp_path / "split", tmp_path / "resumed.st"
    assert main(["calibrate", *common, "--out", str(whole)]) == 0
    assert main(["calibrate", *common, "--max-stats-gb", "1e-4", "--out", str(split)]) == 0
    assert len(list(split.glob("pass-*.safetensors"))) > 1
    assert main(["calibrate", *common[:4], "--num-prompts", "1", *common[6:], "--out", str(resumed)]) == 0
    assert main(["calibrate", *common, "--resume", "--out", str(resumed)]) == 0
    a = distill.CalibStats.load(whole)
    for other in (distill.CalibStats.load(split), distill.CalibStats.load(resumed)):
        assert sorted(other.layers) == sorted(a.layers)
        for name, s in a.layers.items():
            assert other.layers[name].rows == s.rows
            torch.testing.assert_close(other.layers[name].xtx, s.xtx, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(other.layers[name].xtr, s.xtr, rtol=1e-5, atol=1e-4)
    # train-lora reads the passes one site at a time and gives the LoRA of the single file; the preset comes
    # from the statistics (flux-all: 34 layers, where the default would give 20)
    loras = []
    for calib in (whole, split):
        lynx = tmp_path / f"lynx-{calib.stem}"
        assert main(["train-lora", *common[:2], "--calib", str(calib), "--rank", "2", "--device", "cpu",
                     "--out", str(lynx)]) == 0
        loras.append(load_file(str(lynx / rtlynx.io.LORA_FILE)))
    assert sorted(loras[0]) == sorted(loras[1]) and len(loras[0]) == 2 * len(a.layers) == 2 * 34
    for key, t in loras[0].items():
        torch.testing.assert_close(loras[1][key], t, rtol=1e-4, atol=1e-5)
    other_prompts = tmp_path / "other.txt"
    other_prompts.write_text("a green tree\na sun\na dog\n")
    with pytest.raises(SystemExit, match="other prompts"):
        main(["calibrate", *common[:2], "--prompts", str(other_prompts), *common[4:], "--resume", "--out",
              str(resumed)])


def test_bad_inputs_one_line_and_nothing_written(pipes, tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    empty_prompts = tmp_path / "none.txt"
    empty_prompts.write_text("\n  \n")
    out = tmp_path / "out"
    cases = [
        (["generate", "--model", str(empty_dir), "--prompt", "x", "--out", str(out)], "not a diffusers pipeline"),
        (["generate", "--model", str(sd), "--prompt", "x", "--out", str(out)], "not supported"),
        (["calibrate", "--model", str(empty_dir), "--prompts", str(pipes["prompts"]), "--out", str(out)],
         "not a diffusers pipeline"),
        (["calibrate", "--model", str(pipes["flux"]), "--prompts", str(empty_prompts), "--out", str(out)],
         "holds no prompts"),
        (["select", "--model", str(sd), "--speed-table", "x.json", "--out", str(out)], "not supported"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert msg in str(e.value) and "\n" not in str(e.value)
        assert not out.exists()


@pytest.mark.slow
def test_lora_of_another_model_is_refused(pipes, tmp_path):
    from rtlynx.integrations.diffusers import tiny_transformer

    other = tiny_transformer("z-image")
    rtlynx.sparsify(other, lora_rank=2)
    rtlynx.save(other, tmp_path / "zlynx")
    out = tmp_path / "gen"
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(pipes["flux"]), "--lynx", str(tmp_path / "zlynx"), "--prompt", "x",
              *SAMPLE, "--out", str(out)])
    assert "ZImageTransformer2DModel" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def _synthetic_table(sel_shapes, slow_n=64):
    """Sites of width N <= slow_n lose (0.7x), the others win (1.3x): a known answer."""
    return {"device": "synthetic", "rows": [{"M": m, "K": k, "N": n, "dense_ms": k * n * 1e-4,
                                             "lynx_linear_ms": k * n * 1e-4 / (0.7 if n <= slow_n else 1.3)}
                                            for m, k, n in sel_shapes]}


@pytest.mark.slow
def test_select_picks_fast_sites_within_budget(pipes, tmp_path, monkeypatch):
    from rtlynx import select
    from rtlynx.pipelines import load_runner

    ranks, costs = [], select.layer_costs  # without --calib the costs are norm-only whatever the rank (default fill)
    monkeypatch.setattr(select, "layer_costs", lambda stats, rank=0, **k: ranks.append(rank) or costs(stats, rank, **k))

    runner = load_runner(pipes["flux"], device="cpu")
    rtlynx.sparsify(runner.transformer, preset="flux-all")
    rows = select.calls_per_step(runner.transformer, lambda: runner.sample(["a cat"], steps=1, height=SIZE, width=SIZE,
                                                                           latent=True))
    shapes = {(rows[g.layers[0]][0], g.k, sum(g.ns)) for g in distill.stat_groups(runner.transformer)}
    rtlynx.unsparsify(runner.transformer)
    table = tmp_path / "table.json"
    table.write_text(json.dumps(_synthetic_table(shapes)))
    sel = select.select_layers(runner, budget=0.8, speed_table=table, height=SIZE, width=SIZE, steps=2)
    assert ranks == [0]
    chosen = sel["selected"]
    assert chosen and all(c.speedup > 1 for c in chosen) and all(c.n > 64 for c in chosen)
    assert sum(c.cost for c in chosen) <= sel["budget"]
    # maximal: no fast site left out would still fit the budget
    spare = sel["budget"] - sum(c.cost for c in chosen)
    assert all(c.cost > spare for c in sel["candidates"] if c not in chosen and c.speedup > 1.02)
    # the preset file drives sparsify, save and load
    preset = select.write_preset_file(tmp_path / "p.json", "FluxTransformer2DModel",
                                      [n for c in chosen for n in c.layers])
    rtlynx.sparsify(runner.transformer, preset=str(preset))
    assert sorted(rtlynx.sparse_layers(runner.transformer)) == sorted(n for c in chosen for n in c.layers)
    rtlynx.save(runner.transformer, tmp_path / "saved")
    rtlynx.unsparsify(runner.transformer)
    rtlynx.load(runner.transformer, tmp_path / "saved")
    assert sorted(rtlynx.sparse_layers(runner.transformer)) == sorted(n for c in chosen for n in c.layers)
    from rtlynx.integrations.diffusers import tiny_transformer

    with pytest.raises(ValueError, match="made for FluxTransformer2DModel"):
        rtlynx.sparsify(tiny_transformer("z-image"), preset=str(preset))
    # the command writes the file; on a CPU without a table it refuses with one line
    out = tmp_path / "cli.json"
    assert main(["select", "--model", str(pipes["flux"]), "--speed-table", str(table), "--budget", "0.8", *SAMPLE,
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["include"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no GPU here"):
            main(["select", "--model", str(pipes["flux"]), *SAMPLE, "--out", str(tmp_path / "none.json")])


def test_calibrate_memory_benchmark_smoke(tmp_path):
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    mod = load_benchmark("calibrate_memory")
    out = tmp_path / "cm.json"
    assert mod.main(["--tiny", "--max-stats-gb", "0", "--prompts", "1", "--steps", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["budgets"][0]["passes"][0]["s_per_prompt"] > 0 and r["dense_s_per_prompt"] > 0


def test_generate_fp8_sparse_dtype(pipes, tmp_path):
    """--sparse-dtype fp8 reaches the config that runs and is written (on the CPU the FP8 spec runs on the reference
    path; tests/test_fp8_reference.py checks that path's layer outputs against the spec)."""
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(pipes["flux"]), "--preset", "flux", "--sparse-dtype", "fp8",
                 "--prompt", "a red cat", *SAMPLE, "--out", str(out)]) == 0
    settings = json.loads((out / "generate.json").read_text())["settings"]
    assert settings["sparsity"]["dtype"] == "fp8"


def test_confirm_end_to_end_drops_least_gain_first_until_not_slower():
    """A synthetic model: dense 100 ms; every sparse site saves its table gain but costs 0.3 ms of host time
    in the model. The check must drop whole speed-up tiers, weakest first, and stop at the first set that is not
    slower; with nothing worth it, nothing stays."""
    from rtlynx import select

    def cand(name, speedup, gain):  # dense_ms / sparse_ms = speedup, saves `gain` ms in the model
        return select.Candidate([name], 4096, 256, 256, 1, 0.0, dense_ms=speedup, sparse_ms=1.0), gain

    pairs = [cand("a", 1.30, 1.0), cand("b", 1.30, 1.0), cand("c", 1.05, 0.1), cand("d", 1.02, 0.05),
             cand("e", 1.02, 0.05)]
    gain = {c.layers[0]: g for c, g in pairs}
    timed = []

    def time_with(layers):
        timed.append(sorted(layers))
        return 100.0 - sum(gain[n] - 0.3 for n in layers)

    kept, log = select.confirm_end_to_end([c for c, _ in pairs], time_with)
    # all five: 100 - (2*0.7 - 0.2 - 2*0.25) = 99.3 -> faster already? 1.4 - 0.2 - 0.5 = 0.7 saved: kept as is
    assert sorted(n for c in kept for n in c.layers) == ["a", "b", "c", "d", "e"] and len(log) == 1
    # make the weak sites cost more: the 1.02x tier goes first, then the 1.05x one, and a, b stay
    gain.update(c=-2.0, d=-1.0, e=-1.0)
    timed.clear()
    kept, log = select.confirm_end_to_end([c for c, _ in pairs], time_with)
    assert sorted(n for c in kept for n in c.layers) == ["a", "b"]
    assert timed == [[], ["a", "b", "c", "d", "e"], ["a", "b", "c"], ["a", "b"]]
    assert [r["sites"] for r in log] == [5, 3, 2] and all(r["dense_ms"] == 100.0 for r in log)
    # nothing gains in the model: the model stays dense
    gain.update(a=0.1, b=0.1)
    kept, log = select.confirm_end_to_end([c for c, _ in pairs], time_with)
    assert kept == [] and log[-1]["sites"] == 2


def test_timer_with_layers_sparsifies_exactly_those_for_the_call():
    from rtlynx import select
    from rtlynx.integrations.diffusers import tiny_transformer

    model = tiny_transformer("flux")
    names = rtlynx.eligible_layers(model)[:3]
    time_with = select.timer_with_layers(model, lambda: sorted(rtlynx.sparse_layers(model)))
    assert time_with(names) == sorted(names)
    assert not rtlynx.sparse_layers(model)  # dense again after the call
    assert time_with([]) == []
    # select --centre token_mean: the timed sites run centred, as they will be deployed
    centred = select.timer_with_layers(model, lambda: rtlynx.config_of(model).centre, centre="token_mean")
    assert centred(names) == "token_mean" and not rtlynx.sparse_layers(model)
