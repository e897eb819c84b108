"""Smoke test of benchmarks/tiling.py: quick mode times every tiling step and the reader against bare read_region."""

from __future__ import annotations

import math
from pathlib import Path

from tests.benchmarks import load_benchmark


def test_tiling_quick_times_every_step(tmp_path: Path, capsys) -> None:
    bench = load_benchmark("tiling")
    table = bench.main(["--quick", "--out", str(tmp_path)])
    assert list(table.columns) == ["2,000²"]
    col = table["2,000²"]
    assert 0 < col["kept tiles"] <= col["grid tiles"]
    for row in ("low-res read s", "tissue s", "grid s", "whole stage s"):
        assert math.isfinite(col[row]) and col[row] >= 0, row
    speeds = ("reader grid tiles/s", "reader random tiles/s", "read_region random tiles/s (ref)", "reader 2 workers tiles/s")
    for row in speeds:
        assert math.isfinite(col[row]) and col[row] > 0, row
    # the ratio is computed from the two figures printed beside it, not from a third measurement
    ratio = col["reader random tiles/s"] / col["read_region random tiles/s (ref)"]
    assert math.isclose(col["reader random / ref"], ratio)
    assert "peak RSS of this process" in capsys.readouterr().out
