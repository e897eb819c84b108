"""Lint and format, checked in the suite so that CI fails on either (settings: [tool.ruff] in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check_passes():
    r = ruff("check", "--output-format", "concise", ".")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_ruff_format_leaves_every_file_as_it_is():
    r = ruff("format", "--check", ".")
    assert r.returncode == 0, f"run `ruff format .`:\n{r.stdout[-3000:]}{r.stderr[-1000:]}"


def test_no_formatter_escapes():
    """Code is formatted as a whole: no `fmt: skip` / `fmt: off` markers."""
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for d in ("mil", "extract", "train", "evaluate", "tests", "benchmarks")
        for p in (ROOT / d).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "# fmt: " + "skip" in line or "# fmt: " + "off" in line
    ]
    assert not hits, hits
