"""Smoke test of benchmarks/bagnet_step.py: both allocator settings run a training step in their own process."""

from __future__ import annotations

from tests.benchmarks import load_benchmark


def test_bagnet_step_measures_both_allocator_settings(capsys) -> None:
    bench = load_benchmark("bagnet_step")
    (row,) = bench.main(["--canvases", "32", "--batch-size", "2", "--width", "0.0625", "--steps", "1"])
    assert row["canvas"] == 32 and row["speedup"] > 0
    for r in (row["default"], row["keep_heap"]):
        assert r["wall"] > 0 and r["user"] >= 0 and r["sys"] >= 0
    assert "speed-up" in capsys.readouterr().out
