"""benchmarks/quality_ladder.py: the FID ladder plot and its JSON come from the quality results files, and runs that
disagree on the dense FID (not one protocol) are refused."""

import json
import shutil

import pytest

from conftest import load_benchmark


def test_ladder_reads_the_files_and_plots(tmp_path):
    q = load_benchmark("quality_ladder")
    out = tmp_path / "ladder.png"
    assert q.main(["--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    rows = {r["label"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert len(rows) == len(q.LADDER)
    shipped = json.loads((q.RESULTS / "quality.json").read_text())["variants"]
    assert rows["activation 2:4 (naive)"]["every_step"]["fid"] == shipped["act24"]["fid"]
    both = rows["RT-Lynx, centred + global (step 200)"]
    assert both["every_step"]["over_dense"] == pytest.approx(both["every_step"]["fid"] / 16.6218, rel=1e-4)


def test_ladder_refuses_runs_of_other_protocols(tmp_path):
    q = load_benchmark("quality_ladder")
    for f1, _, f2, _ in q.LADDER.values():
        for f in (f1, f2):
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(q.RESULTS / f, tmp_path / f)
    doc = json.loads((tmp_path / "quality.json").read_text())
    doc["variants"]["dense"]["fid"] = 15.0  # as if another protocol (e.g. fp32 sampling) made this run
    (tmp_path / "quality.json").write_text(json.dumps(doc))
    with pytest.raises(SystemExit, match="not one protocol"):
        q.main(["--results", str(tmp_path), "--out", str(tmp_path / "l.png")])
