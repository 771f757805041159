"""The READMEs quote only benchmark files that exist (benchmarks/ keeps current results; history is in git)."""

from __future__ import annotations

import glob
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quoted_paths(text: str) -> list[str]:
    return sorted({m.rstrip(".,;:") for m in re.findall(r"benchmarks/[A-Za-z0-9_./*-]+", text)})


def test_every_quoted_benchmark_file_exists():
    paths = quoted_paths((ROOT / "README.md").read_text())
    assert len(paths) >= 10
    missing = [p for p in paths if not glob.glob(str(ROOT / p))]
    assert missing == []


def test_every_benchmark_readme_quotes_existing_files():
    """The notes beside the results (benchmarks/*/README.md), where the main README sends experiment details."""
    notes = sorted((ROOT / "benchmarks").glob("*/README.md"))
    assert notes
    for note in notes:
        missing = [p for p in quoted_paths(note.read_text()) if not glob.glob(str(ROOT / p))]
        assert missing == [], note


def test_the_check_sees_a_missing_file():
    assert quoted_paths("see `benchmarks/nowhere/results.json`.") == ["benchmarks/nowhere/results.json"]
    assert not glob.glob(str(ROOT / "benchmarks/nowhere/results.json"))
