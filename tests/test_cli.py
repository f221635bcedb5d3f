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
