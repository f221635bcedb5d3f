"""Every number in the README's results tables appears in the results file the table names (issue 22).

A table's files are the ``.json`` paths in backticks in its section heading and in the text between the previous
table (or the heading) and the table; a bare name is looked up in benchmarks/results/ and docs/. A number printed
with d decimals must equal some number of those files rounded to d decimals, read as is or in another unit (x1000:
s -> ms; x100: a fraction as percent; bytes -> GiB). The first column (the row's label) is not checked."""

import glob
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCALES = (1.0, 1e3, 1e-3, 100.0, 2.0 ** -30)
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.]*[:x]\d)")  # not 2:4 or 1024x1024


def _leaves(obj, out: list) -> list:
    if isinstance(obj, bool):
        return out
    if isinstance(obj, (int, float)):
        out.append(float(obj))
    elif isinstance(obj, dict):
        for v in obj.values():
            _leaves(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _leaves(v, out)
    return out


def _files(text: str) -> list[Path]:
    found = []
    for name in re.findall(r"`([^`\s]*\.json)`", text):
        for base in ("", "benchmarks/results/", "docs/"):
            found += [Path(p) for p in glob.glob(str(ROOT / (base + name)))]
    return found


def results_tables(readme: str):
    """(heading, files, [rows of cells]) for every table under '## Results'."""
    start = readme.index("\n## Results")
    end = readme.find("\n## ", start + 5)
    section = readme[start: end if end > 0 else len(readme)]
    tables = []
    for part in section.split("\n### ")[1:]:
        heading, _, body = part.partition("\n")
        context, rows = heading, []
        for line in body.splitlines() + [""]:
            if line.startswith("|"):
                if not set(line) <= set("|-: "):
                    rows.append([c.strip() for c in line.strip().strip("|").split("|")])
                continue
            if rows:
                tables.append((heading, _files(context), rows[1:]))  # rows[0]: the header
                context, rows = heading, []
            context += "\n" + line
    return tables


def test_every_results_number_is_in_its_file():
    tables = results_tables((ROOT / "README.md").read_text())
    assert len(tables) >= 4
    missing = []
    for heading, files, rows in tables:
        assert files, f"a table under '{heading}' names no results file"
        values = [v for f in files for v in _leaves(json.loads(f.read_text()), [])]
        for row in rows:
            for cell in row[1:]:
                for m in NUMBER.finditer(cell):
                    text = m.group(1)
                    d = len(text.partition(".")[2])
                    x = float(text)
                    if not any(abs(round(v * k, d) - x) < 1e-9 for v in values for k in SCALES):
                        missing.append(f"{heading[:40]} | {row[0][:30]} | {cell}: {text}")
    assert not missing, "README numbers not in the named files:\n" + "\n".join(missing)
