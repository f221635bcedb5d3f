"""The device session scripts: named by what they measure, set up by the one benchmarks/device_setup.sh, valid bash."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SESSIONS = sorted(BENCH.glob("*_session.sh"))
OWN_SETUP = {"quality_global_session.sh"}  # installs into .cache/site across its chained calls (lead's, issue 18)


def test_no_script_is_named_by_an_issue_number():
    assert SESSIONS and not [p.name for p in BENCH.iterdir() if re.search(r"issue\d", p.name)]


@pytest.mark.parametrize("path", SESSIONS, ids=lambda p: p.name)
def test_session_scripts_share_the_set_up(path):
    text = path.read_text()
    if path.name in OWN_SETUP:
        return
    # delegated: the script only runs other session scripts (exec, or chained stages of S=benchmarks/..._session.sh)
    delegated = re.search(r"exec bash benchmarks/\w+_session\.sh|^S=benchmarks/\w+_session\.sh$", text, re.M) is not None
    assert "source benchmarks/device_setup.sh" in text or delegated
    assert "pip install" not in text and "rtlynx.ops._build" not in text  # device_setup.sh's job


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("path", [*SESSIONS, BENCH / "device_setup.sh"], ids=lambda p: p.name)
def test_scripts_parse(path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
