"""Smoke test of benchmarks/heatmap.py: quick mode renders one heatmap next to its reference, in fresh processes."""

from __future__ import annotations

import math
from pathlib import Path

from tests.benchmarks import load_benchmark


def test_heatmap_quick(tmp_path: Path) -> None:
    bench = load_benchmark("heatmap")
    table = bench.main(["--quick", "--out", str(tmp_path)])
    assert list(table["thumbnail px"]) == [256]
    row = table.iloc[0]
    for col in (
        "`mil evaluate heatmap` end to end s",
        "heatmap call s",
        "ref s (get_thumbnail + forward)",
        "heatmap / ref",
        "RSS after imports MiB",
        "RSS with bag MiB",
        "peak RSS during call MiB",
    ):
        assert math.isfinite(row[col]) and row[col] > 0, (col, row[col])
    assert row["RSS after imports MiB"] > 100  # torch is imported: MiB, not KiB or GiB
    assert row["peak RSS during call MiB"] >= row["RSS with bag MiB"] - 1  # the peak is reset after the bag is read
    assert (tmp_path / "heatmap_256.png").stat().st_size > 0 and (tmp_path / "cli_256.png").stat().st_size > 0
