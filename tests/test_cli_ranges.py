"""The CLI repros of issue 22: numbers out of range, bad devices and files end in one line (argparse's exit 2 with
"must be ..." or the command's SystemExit), before anything is loaded or written; one dialect; a fast --help."""

import json
import re
import subprocess
import sys

import pytest
import torch

from rtlynx.cli import build_parser, main

# (argv, the option named in the error): each must exit 2 before any work
OUT_OF_RANGE = [
    (["train-lora", "--calib", "x", "--out", "y", "--rank", "0"], "--rank"),          # defect 4
    (["train-lora", "--calib", "x", "--out", "y", "--ridge", "-1"], "--ridge"),       # defect 9
    (["train-lora", "--calib", "x", "--out", "y", "--ridge", "nan"], "--ridge"),
    (["calibrate", "--out", "y", "--batch-size", "-1"], "--batch-size"),             # defect 5
    (["calibrate", "--out", "y", "--batch-size", "0"], "--batch-size"),
    (["calibrate", "--out", "y", "--num-prompts", "0"], "--num-prompts"),
    (["calibrate", "--out", "y", "--save-every", "0"], "--save-every"),
    (["calibrate", "--out", "y", "--max-stats-gb", "-1"], "--max-stats-gb"),
    (["calibrate", "--out", "y", "--steps", "0"], "--steps"),
    (["generate", "--prompt", "a", "--height", "0"], "--height"),
    (["generate", "--prompt", "a", "--width", "-64"], "--width"),
    (["generate", "--prompt", "a", "--dense-below-t", "abc"], "--dense-below-t"),
    (["generate", "--prompt", "a", "--dense-below-t", "inf"], "--dense-below-t"),
    (["generate", "--prompt", "a", "--dense-above-t", "abc"], "--dense-above-t"),
    (["generate", "--prompt", "a", "--dense-above-t", "-0.5"], "--dense-above-t"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--num-prompts", "0"], "--num-prompts"),
    (["demo", "--dense-below-t", "abc"], "--dense-below-t"),
    (["analyze", "--max-tokens", "0"], "--max-tokens"),
    (["analyze", "--batches", "0"], "--batches"),
    (["select", "--budget", "0"], "--budget"),
    (["train-reference", "--out", "o", "--minutes", "-1"], "--minutes"),
]


@pytest.mark.parametrize("argv,flag", OUT_OF_RANGE, ids=[" ".join(a[-2:]) for a, _ in OUT_OF_RANGE])
def test_out_of_range_numbers_exit_2_with_one_line(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and flag in err[-1] and "must be" in err[-1], err
    assert list(tmp_path.iterdir()) == []  # nothing written


def _one_line(e) -> str:
    msg = str(e.value.code)
    assert isinstance(e.value.code, str) and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "a", "--device", "bogus"],
    ["calibrate", "--out", "c", "--prompts-file", "p.txt", "--device", "bogus"],
    ["calibrate", "--out", "c", "--prompts-file", "p.txt", "--stats-device", "tpu"],
    ["demo", "--device", "bogus"],
])
def test_bad_device_is_one_line(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a red cat\n")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert "device" in _one_line(e)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_demo_on_cuda_without_a_gpu_is_one_line():
    with pytest.raises(SystemExit) as e:
        main(["demo", "--device", "cuda"])
    assert "no CUDA GPU" in _one_line(e)


def test_demo_with_a_wrong_lynx_folder_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--device", "cpu", "--lynx", str(tmp_path / "nowhere")])
    assert "--lynx" in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:  # the old name, a folder that holds no save
        main(["demo", "--device", "cpu", "--lora-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert "missing" in _one_line(e) and not (tmp_path / "o").exists()


def test_analyze_bad_pattern_is_one_line():
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--n", "3", "--m", "2"])
    assert "--n 3 --m 2" in _one_line(e)


def test_train_reference_without_the_data_set_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train-reference", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o"), "--minutes", "1"])
    assert "rtlynx data emoji64" in _one_line(e) and not (tmp_path / "o").exists()


def test_help_prints_each_default_once():
    from test_cli import _all_parsers

    for path, parser in _all_parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        assert not re.search(r"\(default: [^)]*\) \(default", text), path


def test_help_imports_no_torch_and_is_fast():
    code = ("import sys, time; t = time.perf_counter(); from rtlynx.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'rtlynx --help imported torch'\n"
            "print(time.perf_counter() - t, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert float(r.stderr.strip().splitlines()[-1]) < 2.0
    assert "train-lora" in r.stdout and "demo" in r.stdout


def test_one_dialect_with_hidden_old_names():
    """--model / --lynx / --sparse-dtype / --prompts-file in every command that takes them; the 0.1 names parse
    to the same option but are not in --help."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for cmd in ("demo", "generate", "calibrate", "train-lora", "select"):
        text = sub[cmd].format_help()
        assert "--model " in text and "--model-dir" not in text and "--lora-dir" not in text, cmd
    for cmd in ("demo", "generate"):
        assert "--lynx" in sub[cmd].format_help() and "--sparse-dtype" in sub[cmd].format_help()
    old = parser.parse_args(["demo", "--model-dir", "m", "--lora-dir", "l", "--dtype", "fp8"])
    new = parser.parse_args(["demo", "--model", "m", "--lynx", "l", "--sparse-dtype", "fp8"])
    assert (old.model, old.lynx, old.sparse_dtype) == (new.model, new.lynx, new.sparse_dtype) == ("m", "l", "fp8")
    assert parser.parse_args(["demo"]).model == "miniflux"
    for cmd in ("calibrate", "select"):
        assert "--prompts-file" in sub[cmd].format_help()
        args = parser.parse_args([cmd, "--prompts", "p.txt", *(["--out", "o"] if cmd == "calibrate" else [])])
        assert args.prompts == "p.txt"


# ------------------------------------------------------------------------ the mini-FLUX loop (defects 6, LoRA schedule)
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    from rtlynx.testing import save_tiny_miniflux

    return save_tiny_miniflux(tmp_path_factory.mktemp("miniflux"))


def _calibrate(tiny_dir, out, *extra):
    return main(["calibrate", "--model", str(tiny_dir), "--device", "cpu", "--prompts-file",
                 str(tiny_dir / "prompts.txt"), "--num-prompts", "2", "--batch-size", "1", "--steps", "2",
                 "--out", str(out), *extra])


@pytest.mark.parametrize("change", [["--steps", "3"], ["--preset", "flux-all"], ["--seed", "5"]])
def test_resume_with_other_settings_is_refused(tiny_dir, tmp_path, change):
    """Defect 6: --resume checks every sampling setting, not only the prompts, and writes nothing when they differ."""
    out = tmp_path / "calib.safetensors"
    assert main(["calibrate", "--model", str(tiny_dir), "--device", "cpu", "--prompts-file",
                 str(tiny_dir / "prompts.txt"), "--num-prompts", "1", "--batch-size", "1", "--steps", "2",
                 "--out", str(out)]) == 0
    before = out.read_bytes()
    steps = change if change[0] == "--steps" else ["--steps", "2"]
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(tiny_dir), "--device", "cpu", "--prompts-file", str(tiny_dir / "prompts.txt"),
              "--num-prompts", "2", "--batch-size", "1", *steps, *(change if change[0] != "--steps" else []),
              "--out", str(out), "--resume"])
    assert change[0] in _one_line(e)
    assert out.read_bytes() == before


def test_train_lora_saves_a_step_schedule_that_generate_and_demo_use(tiny_dir, tmp_path, capsys):
    calib, lynx = tmp_path / "calib.safetensors", tmp_path / "lynx"
    assert _calibrate(tiny_dir, calib) == 0
    assert main(["train-lora", "--model", str(tiny_dir), "--device", "cpu", "--calib", str(calib), "--rank", "2",
                 "--out", str(lynx)]) == 0
    saved = json.loads((lynx / "rtlynx_config.json").read_text())["config"]
    assert saved["dense_below_t"] == 0.2  # not null: generate would sample every step sparse
    capsys.readouterr()
    assert main(["demo", "--model", str(tiny_dir), "--device", "cpu", "--lynx", str(lynx), "--steps", "1",
                 "--prompt", "fire, noto style", "--out", str(tmp_path / "demo")]) == 0
    assert "dense below (from the LoRA's saved schedule" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["dense_below_t"] == 0.2


def test_select_says_why_nothing_was_selected():
    from argparse import Namespace

    from rtlynx.commands.select import why_none
    from rtlynx.select import Candidate

    args = Namespace(min_speedup=1.02, budget=1.0)
    unknown = Candidate(["a"], 64, 64, 192, 1, 0.1)
    slow = Candidate(["b"], 4096, 3072, 9216, 1, 0.1, dense_ms=1.0, sparse_ms=1.25)
    fast = Candidate(["c"], 4096, 3072, 3072, 1, 9.0, dense_ms=1.0, sparse_ms=0.8)
    line = why_none([unknown, slow, fast], args)
    assert "1 of 3 sites have shapes the speed table does not hold" in line
    assert "1 are below --min-speedup 1.02 (best 0.80x at M=4096, K=3072, N=9216)" in line
    assert "1 fast enough but each over the quality budget 1.0" in line and "\n" not in line


def test_demo_on_another_model_skips_the_shipped_lora(tiny_dir, tmp_path):
    """The shipped LoRA fits the shipped mini-FLUX only: another model without --lynx runs without one."""
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_dir), "--device", "cpu", "--steps", "1", "--prompt", "fire, noto style",
                 "--out", str(out)]) == 0
    assert "rtlynx" not in json.loads((out / "metrics.json").read_text())["variants"]


@pytest.mark.parametrize("key,value", [("rr", float("nan")), ("rows", -1), ("yy", float("inf"))])
def test_train_lora_refuses_bad_statistics(tiny_dir, tmp_path, key, value):
    """NaN / negative numbers in a statistics file end in one line naming the file, the layer and the field."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    calib = tmp_path / "calib.safetensors"
    assert main(["calibrate", "--model", str(tiny_dir), "--device", "cpu", "--prompts-file",
                 str(tiny_dir / "prompts.txt"), "--num-prompts", "1", "--steps", "2", "--out", str(calib)]) == 0
    with safe_open(str(calib), "pt") as f:
        md = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scalars = json.loads(md["scalars"])
    first = next(iter(scalars))
    scalars[first][key] = value
    md["scalars"] = json.dumps(scalars)
    save_file(tensors, str(calib), metadata=md)
    with pytest.raises(SystemExit) as e:
        main(["train-lora", "--model", str(tiny_dir), "--device", "cpu", "--calib", str(calib), "--out",
              str(tmp_path / "lynx")])
    assert f"{first} {key}" in _one_line(e) and not (tmp_path / "lynx").exists()


def test_select_centre_with_calib_is_one_line(tmp_path):
    """--centre sets only the quick measurement; with --calib the statistics' own setting counts: refused before
    anything is loaded (the model path does not even exist)."""
    with pytest.raises(SystemExit, match="with --calib the statistics carry their own"):
        main(["select", "--model", str(tmp_path / "none"), "--calib", str(tmp_path / "c.safetensors"),
              "--centre", "token_mean", "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()
