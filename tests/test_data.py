"""The shipped data (data/): every file in data/README.md's table is there with the listed lines, bytes and
sha256, and every data file is listed, so an edited, added or lost data file fails CI."""
from __future__ import annotations

import re

import pytest

from effir_export.hashing import file_sha256
from effir_export.paths import DATA_DIR
from effir_export.validation.beir import load_beir

ROW = re.compile(r"^\| `(?P<file>[^`]+)` \| (?P<lines>\d+) \| (?P<bytes>\d+) \| `(?P<sha256>[0-9a-f]{64})` \|$")


def listed() -> dict[str, dict]:
    rows = [ROW.match(line) for line in (DATA_DIR / "README.md").read_text().splitlines()]
    return {m["file"]: {"lines": int(m["lines"]), "bytes": int(m["bytes"]), "sha256": m["sha256"]} for m in rows if m}


def test_every_data_file_is_listed_and_every_listed_file_is_there():
    on_disk = {str(p.relative_to(DATA_DIR)) for p in DATA_DIR.rglob("*") if p.is_file() and p.name != "README.md"}
    assert len(listed()) == 8 and set(listed()) == on_disk


@pytest.mark.parametrize("name", sorted(listed()))
def test_data_file_matches_its_readme_row(name):
    path, row = DATA_DIR / name, listed()[name]
    assert path.stat().st_size == row["bytes"]
    assert path.read_bytes().count(b"\n") == row["lines"]
    assert file_sha256(path) == row["sha256"]


@pytest.mark.parametrize("subset,judged,judgments", [("dbpedia_subset", 40, 3709), ("msmarco_subset", 43, 4102)])
def test_beir_subsets_load_with_the_counts_the_readme_gives(subset, judged, judgments):
    summary = load_beir(DATA_DIR / subset).summary()  # fails on a judged document missing from the corpus
    assert (summary["documents"], summary["queries"], summary["judgments"]) == (5000, judged, judgments)
