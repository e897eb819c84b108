"""Smoke test of benchmarks/bf16_cast.py: both encoders run, interleaved, and agree."""

from __future__ import annotations

from tests.benchmarks import load_benchmark


def test_bf16_cast_quick() -> None:
    r = load_benchmark("bf16_cast").main(["--quick"])
    assert len(r["cast"]) == len(r["autocast"]) == len(r["ratios"]) == 2
    assert min(r["cast"] + r["autocast"]) > 0 and r["cosine_min"] > 0.99
