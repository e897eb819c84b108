"""Smoke test of benchmarks/extract_memory.py: quick mode runs the real CLI per slide and reads its peak RSS."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks import load_benchmark


def test_extract_memory_quick(tmp_path: Path) -> None:
    bench = load_benchmark("extract_memory")
    table = bench.main(["--quick", "--out", str(tmp_path)])
    assert list(table["slide"]) == ["2,000²", "2,800²"]
    assert (table["tiles"] > 0).all() and table["tiles"].iloc[1] > table["tiles"].iloc[0]
    assert (table["wall s"] > 0).all()
    # a process that imported torch holds well over 100 MiB; under 100 GiB rules out a KiB/MiB slip the other way
    assert table["peak RSS MiB (largest process)"].between(100, 100 * 1024).all(), table
