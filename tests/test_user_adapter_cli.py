"""`--adapter`: the commands run with a user's LoRA adapter active, and the compensation is fitted with it on
(calibrate -> train-lora, and train-lora --objective global); the save records which adapter, and generate says
when it runs under another. Tiny random mini-FLUX on the CPU, reference path."""

import hashlib
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

import rtlynx
from rtlynx import distill, io
from rtlynx.cli import main
from rtlynx.models.miniflux import load_miniflux
from rtlynx.testing import save_tiny_miniflux

TARGETS = ["to_q", "to_k", "to_v", "proj_mlp", "ff.net.0.proj"]
SAMPLE = ["--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_miniflux(tmp_path_factory.mktemp("mf") / "mf", seed=0)


def adapter_state(model_dir, seed: int) -> dict:
    """A random (non-zero) rank-4 PEFT adapter of the tiny model, as PEFT's state dict (no 'transformer.')."""
    m = load_miniflux(model_dir)
    torch.manual_seed(seed)
    m.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
                              adapter_name="x")
    return {k: v.detach().clone().contiguous() * 4  # strong: the images must change visibly
            for k, v in get_peft_model_state_dict(m.transformer, adapter_name="x").items()}


def write_adapter(path, state, diffusers_keys: bool):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({("transformer." + k if diffusers_keys else k): v for k, v in state.items()}, str(path))
    return path


def with_peft(model_dir, state, scale=1.0):
    """The independent path: the adapter added with PEFT's own calls, then scaled."""
    m = load_miniflux(model_dir)
    m.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), adapter_name="ref")
    set_peft_model_state_dict(m.transformer, state, adapter_name="ref")
    m.transformer.set_adapters(["ref"], weights=[scale])
    return m


@pytest.mark.parametrize("diffusers_keys", [True, False])
def test_load_adapter_is_peft_s_adapter(tiny, tmp_path, seed, diffusers_keys):
    from rtlynx.pipelines import load_runner

    state = adapter_state(tiny, seed)
    f = write_adapter(tmp_path / "a.safetensors", state, diffusers_keys)
    runner = load_runner(str(tiny), device="cpu")
    fp = runner.load_adapter(f, 0.5)
    assert fp == {"file": "a.safetensors", "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "scale": 0.5}
    ref = with_peft(tiny, state, 0.5)
    plain = load_miniflux(tiny)
    with torch.no_grad():
        got = runner.model.sample(["a red cat"], num_steps=2, seed=seed)
        want = ref.sample(["a red cat"], num_steps=2, seed=seed)
        base = plain.sample(["a red cat"], num_steps=2, seed=seed)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the adapter does act


def test_bad_adapters_are_one_line(tiny, tmp_path, seed):
    state = adapter_state(tiny, seed)
    two = tmp_path / "two"
    write_adapter(two / "a.safetensors", state, True)
    write_adapter(two / "b.safetensors", state, True)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    alien = write_adapter(tmp_path / "alien.safetensors",
                          {k.replace("transformer_blocks", "no_such_blocks"): v for k, v in state.items()
                           if "single" not in k}, True)
    no_lora = tmp_path / "nolora.safetensors"
    save_file({"w": torch.ones(2)}, str(no_lora))
    cases = [(tmp_path / "absent.safetensors", "no such file"), (two, "more than one"),
             (junk, "not a safetensors file"), (no_lora, "no LoRA factors"), (alien, "")]
    for path, why in cases:
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(tiny), "--adapter", str(path), "--prompt", "x", *SAMPLE,
                  "--out", str(tmp_path / "o")])
        msg = str(e.value.code)
        assert "\n" not in msg and "--adapter" in msg and why in msg, msg
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match="--adapter-scale needs --adapter"):
        main(["generate", "--model", str(tiny), "--adapter-scale", "0.5", "--prompt", "x", *SAMPLE,
              "--out", str(tmp_path / "o")])


def test_calibrate_and_train_lora_under_an_adapter(tiny, tmp_path, seed):
    state = adapter_state(tiny, seed)
    f = write_adapter(tmp_path / "style" / "pytorch_lora_weights.safetensors", state, True)
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    common = ["--model", str(tiny), "--prompts-file", str(tiny / "prompts.txt"), "--num-prompts", "2",
              "--batch-size", "2", *SAMPLE]
    calib, plain = tmp_path / "calib.safetensors", tmp_path / "plain.safetensors"
    assert main(["calibrate", *common, "--adapter", str(f.parent), "--out", str(calib)]) == 0
    assert main(["calibrate", *common, "--out", str(plain)]) == 0
    stats = distill.CalibStats.load(calib)
    assert json.loads(stats.meta["adapter"]) == {"file": f.name, "sha256": sha, "scale": 1.0}
    assert distill.CalibStats.load(plain).meta["adapter"] == "none"
    # the statistics are those of the dense + adapter sampler: collected again through PEFT's own calls
    ref = with_peft(tiny, state)
    rtlynx.sparsify(ref.transformer)
    prompts = (tiny / "prompts.txt").read_text().splitlines()[:2]
    want = distill.collect(ref.transformer, lambda: ref.sample(prompts, num_steps=2, seed=0))
    base = distill.CalibStats.load(plain)
    for name, s in want.layers.items():
        got = stats.layers[name]
        for key in ("xtx", "xtr"):
            a, b = getattr(got, key), getattr(s, key)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        assert not torch.allclose(base.layers[name].xtx, s.xtx, rtol=1e-3)  # the adapter changed what was seen
    # resuming with another adapter (or none) is refused before anything is written
    with pytest.raises(SystemExit, match="adapter"):
        main(["calibrate", *common, "--resume", "--out", str(calib)])
    with pytest.raises(SystemExit, match="adapter"):
        main(["calibrate", *common, "--adapter", str(f), "--adapter-scale", "0.5", "--resume", "--out", str(calib)])
    # train-lora records the adapter; the closed form takes it from the statistics only
    lynx = tmp_path / "lynx"
    assert main(["train-lora", "--model", str(tiny), "--calib", str(calib), "--rank", "2", "--device", "cpu",
                 "--out", str(lynx)]) == 0
    assert io.provenance(lynx) == {"adapter": {"file": f.name, "sha256": sha, "scale": 1.0}}
    with pytest.raises(SystemExit, match="--objective global"):
        main(["train-lora", "--model", str(tiny), "--calib", str(calib), "--adapter", str(f), "--device", "cpu",
              "--out", str(tmp_path / "x")])
    # generate says when the compensation runs under another adapter, and records the one it ran with
    gen = ["generate", "--model", str(tiny), "--lynx", str(lynx), "--prompt", "a red cat", *SAMPLE]
    assert main([*gen, "--out", str(tmp_path / "g1")]) == 0
    assert main([*gen, "--adapter", str(f), "--out", str(tmp_path / "g2")]) == 0
    settings = json.loads((tmp_path / "g2" / "generate.json").read_text())["settings"]
    assert settings["adapter"]["sha256"] == sha and settings["sparse_layers"] > 0


def test_generate_warns_of_another_adapter(tiny, tmp_path, seed, capsys):
    state = adapter_state(tiny, seed)
    f = write_adapter(tmp_path / "a.safetensors", state, True)
    m = load_miniflux(tiny)
    rtlynx.sparsify(m.transformer, lora_rank=2)
    lynx = tmp_path / "lynx"
    io.save(m.transformer, lynx, provenance={"adapter": {"file": "a.safetensors", "sha256": "0" * 64, "scale": 1.0}})
    gen = ["generate", "--model", str(tiny), "--lynx", str(lynx), "--prompt", "a red cat", *SAMPLE]
    assert main([*gen, "--out", str(tmp_path / "g1")]) == 0
    assert "fitted with adapter a.safetensors" in capsys.readouterr().out  # and runs with none
    assert main([*gen, "--adapter", str(f), "--out", str(tmp_path / "g2")]) == 0
    assert "warning: this compensation was fitted" in capsys.readouterr().out  # another file
    io.save(m.transformer, lynx, overwrite=True,
            provenance={"adapter": {"file": "a.safetensors", "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                                    "scale": 1.0}})
    assert main([*gen, "--adapter", str(f), "--out", str(tmp_path / "g3")]) == 0
    assert "warning" not in capsys.readouterr().out  # the same adapter
    assert main([*gen, "--adapter", str(f), "--adapter-scale", "0.5", "--out", str(tmp_path / "g4")]) == 0
    assert "at scale 0.5" in capsys.readouterr().out


def test_global_training_under_an_adapter_keeps_it_frozen(tiny, tmp_path, seed):
    state = adapter_state(tiny, seed)
    f = write_adapter(tmp_path / "a.safetensors", state, False)
    m = load_miniflux(tiny)
    rtlynx.sparsify(m.transformer, lora_rank=2)
    rtlynx.save(m.transformer, tmp_path / "init")
    out = tmp_path / "g"
    assert main(["train-lora", "--objective", "global", "--model", str(tiny), "--init", str(tmp_path / "init"),
                 "--prompts-file", str(tiny / "prompts.txt"), "--steps", "2", "--train-steps", "3",
                 "--rollout-prompts", "2", "--batch-rows", "4", "--device", "cpu", "--adapter", str(f),
                 "--out", str(out)]) == 0
    with pytest.raises(SystemExit, match="made with adapter a.safetensors"):  # resumed without the adapter
        main(["train-lora", "--objective", "global", "--model", str(tiny), "--init", str(tmp_path / "init"),
              "--prompts-file", str(tiny / "prompts.txt"), "--steps", "2", "--train-steps", "4",
              "--rollout-prompts", "2", "--batch-rows", "4", "--device", "cpu", "--resume", "--out", str(out)])
    prov = io.provenance(out)["adapter"]
    assert prov["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    trained, start = io.read(out)[1], io.read(tmp_path / "init")[1]
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the compensation did train
    assert json.loads((out / "distill_report.json").read_text())["adapter"] == prov


def test_train_global_trains_the_compensation_only(tiny, seed):
    from rtlynx.distill_global import GlobalConfig, train_global

    state = adapter_state(tiny, seed)
    m = with_peft(tiny, state)
    rtlynx.sparsify(m.transformer, lora_rank=2)  # after the adapter: the wrapped layers are sparsified too
    rtlynx.configure(m.transformer, backend="reference")
    t = m.transformer
    user = {n: p.detach().clone() for n, p in t.named_parameters() if ".ref." in n}
    comp = {n: l.lora_B.detach().clone() for n, l in rtlynx.sparse_layers(t).items()}
    flags = {n: p.requires_grad for n, p in t.named_parameters()}
    assert user and len(comp) >= 10
    cfg = GlobalConfig(steps=2, batch=4, calls_per_batch=2, rollout_prompts=2, warmup=0)
    train_global(t, lambda ps, s: m.sample(ps, num_steps=2, seed=s), ["a red cat", "a blue dog"], cfg, progress=False)
    assert all(torch.equal(p, user[n]) for n, p in t.named_parameters() if n in user)
    assert any(not torch.equal(l.lora_B, comp[n]) for n, l in rtlynx.sparse_layers(t).items())
    assert {n: p.requires_grad for n, p in t.named_parameters()} == flags


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flux", "qwen-image", "z-image"])
def test_generate_with_an_adapter_on_each_family(kind, tmp_path, seed):
    """A diffusers-format adapter (what pipe.save_lora_weights writes) through `--adapter`: the same images as
    the pipeline with the adapter loaded by diffusers' own call, and other images than without it (dense mode)."""
    pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image

    from rtlynx.pipelines import load_runner
    from rtlynx.testing import SIZE, save_tiny_pipeline

    pipe_dir = save_tiny_pipeline(kind, tmp_path / kind, seed=0)
    runner = load_runner(str(pipe_dir), device="cpu")
    t = runner.transformer
    torch.manual_seed(seed)
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=rtlynx.eligible_layers(t), init_lora_weights=False),
                  adapter_name="x")
    state = {k: v.detach().clone().contiguous() * 2  # the tiny Qwen-Image's images move little at PEFT's init
             for k, v in get_peft_model_state_dict(t, adapter_name="x").items()}
    f = write_adapter(tmp_path / "a" / "pytorch_lora_weights.safetensors", state, True)
    common = ["generate", "--model", str(pipe_dir), "--prompt", "a red cat", "--steps", "2", "--height", str(SIZE),
              "--width", str(SIZE), "--device", "cpu", "--backend", "reference", "--compare"]
    assert main([*common, "--adapter", str(f.parent), "--out", str(tmp_path / "with")]) == 0
    assert main([*common, "--out", str(tmp_path / "without")]) == 0
    fresh = load_runner(str(pipe_dir), device="cpu")
    fresh.pipe.load_lora_weights(str(f.parent), adapter_name="ref")  # diffusers' own loader
    want = np.asarray(fresh.sample(["a red cat"], steps=2, height=SIZE, width=SIZE, seed=0)[0], dtype=np.int16)
    got = np.asarray(Image.open(tmp_path / "with" / "dense_0.png"), dtype=np.int16)  # dense mode: dense + adapter
    plain = np.asarray(Image.open(tmp_path / "without" / "dense_0.png"), dtype=np.int16)
    assert np.abs(got - want).max() <= 1  # PNG rounding
    assert np.abs(got - plain).max() > 8
    assert json.loads((tmp_path / "with" / "generate.json").read_text())["settings"]["adapter"]["file"] == f.name
