import subprocess
import sys

from rtlynx.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference    yes" in out and "lynx" in out


def test_analyze_cli(tmp_path, capsys):
    assert main(["analyze", "--model", "tiny-qwen-image", "--out", str(tmp_path), "--batches", "1"]) == 0
    assert (tmp_path / "layer_errors.csv").is_file() and (tmp_path / "layer_errors.png").is_file()
    assert "activation N:M + norm" in capsys.readouterr().out


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "rtlynx", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "analyze" in r.stdout and "info" in r.stdout


def test_analyze_unknown_model(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="unknown model"):
        main(["analyze", "--model", "sd9", "--out", str(tmp_path)])


def _all_parsers(parser, path=("rtlynx",)):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from rtlynx.cli import build_parser

    missing, seen = [], 0
    for path, parser in _all_parsers(build_parser()):
        assert parser.allow_abbrev is False, f"{' '.join(path)} accepts abbreviated options"
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings:
                continue
            seen += 1
            if not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {action.option_strings[0]}")
            elif action.default not in (None, False, argparse.SUPPRESS) and not action.required:
                # the help screen names the default value
                assert f"default: {action.default}" in " ".join(text.split()), (path, action.option_strings)
    assert seen > 50 and not missing, f"options without help: {missing}"


def test_abbreviated_option_is_rejected(capsys):
    import pytest

    # `demo --num 2` must not become --num-prompts 2 (before issue 22: `demo --model x` became --model-dir x;
    # --model is demo's own option now, one dialect with the other commands)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--num", "2"])
    assert e.value.code == 2 and "--num" in capsys.readouterr().err


def test_calibrate_without_the_data_set_names_both_ways_out(tmp_path, monkeypatch):
    import pytest

    from rtlynx.data import emoji64

    monkeypatch.setattr(emoji64, "DEFAULT_PATH", tmp_path / "absent" / "emoji64.npz")  # a fresh machine
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--out", str(tmp_path / "c.st")])
    msg = str(e.value.code)
    assert "\n" not in msg and "rtlynx data emoji64" in msg and "--prompts-file" in msg
    assert not (tmp_path / "c.st").exists()
    with pytest.raises(SystemExit, match="--prompts-file"):  # an explicit --data that is not there
        main(["calibrate", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "c.st")])
    with pytest.raises(SystemExit, match="cannot read --prompts-file"):
        main(["calibrate", "--prompts-file", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "c.st")])


def test_analyze_pipeline_folder_uses_its_transformer(tmp_path, capsys):
    import json

    from rtlynx.integrations.diffusers import tiny_transformer

    pipe = tmp_path / "pipe"
    tiny_transformer("flux").save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    out = tmp_path / "out"
    assert main(["analyze", "--model", str(pipe), "--out", str(out), "--batches", "1"]) == 0
    assert (out / "layer_errors.csv").read_text().count("\n") > 5  # one row per token linear of the tiny FLUX


def test_analyze_folder_that_is_not_a_model(tmp_path):
    import json

    import pytest

    empty = tmp_path / "empty"
    empty.mkdir()
    sched = tmp_path / "scheduler"
    sched.mkdir()
    (sched / "config.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for folder, why in ((empty, "no config.json"), (sched, "FlowMatchEulerDiscreteScheduler, not a diffusers model"),
                        (broken, "not a diffusers config")):
        with pytest.raises(SystemExit) as e:
            main(["analyze", "--model", str(folder), "--out", str(tmp_path / "o")])
        assert why in str(e.value.code) and "\n" not in str(e.value.code)


def test_bench_writes_to_the_working_folder(tmp_path, monkeypatch):
    import json

    from rtlynx.commands import bench

    script = tmp_path / "ck" / "benchmarks" / "linear.py"
    script.parent.mkdir(parents=True)
    script.write_text("import json, sys\n"
                      "def main(argv):\n"
                      "    open(sys.argv_log, 'w').write(json.dumps(argv))\n"
                      "    return 0\n")
    monkeypatch.setattr(sys, "argv_log", str(tmp_path / "argv.json"), raising=False)
    monkeypatch.setattr(bench, "find_script", lambda: script)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["bench", "--quick"]) == 0
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["--out", str(work / "rtlynx-bench-linear.json")] and "--quick" in argv
    (work / "rtlynx-bench-linear.json").write_text("{}")  # an earlier result is not overwritten
    assert main(["bench"]) == 0
    assert json.loads((tmp_path / "argv.json").read_text())[1] == str(work / "rtlynx-bench-linear-2.json")
    assert main(["bench", "--out", "x.json"]) == 0
    assert json.loads((tmp_path / "argv.json").read_text())[1] == "x.json"


def test_bench_without_the_benchmark_script(monkeypatch):
    import pytest

    from rtlynx.commands import bench

    monkeypatch.setattr(bench, "find_script", lambda: None)  # a wheel install outside a checkout
    with pytest.raises(SystemExit, match="source checkout"):
        main(["bench"])
