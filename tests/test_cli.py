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

    # `demo --model tiny-flux` used to be taken as --model-dir tiny-flux
    with pytest.raises(SystemExit) as e:
        main(["demo", "--model", "tiny-flux"])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err
