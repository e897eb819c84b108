"""Smoke test of benchmarks/vs_clam.py: quick mode (Needle only) runs the real CLI and prints the table."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks import load_benchmark


def test_vs_clam_quick(tmp_path: Path, capsys) -> None:
    table = load_benchmark("vs_clam").main(["--quick", "--out", str(tmp_path)])
    assert list(table.index) == ["needle_bf16", "needle_fp32"]
    assert (table["tiles"] > 0).all() and (table["tiles"] == table["tiles"].iloc[0]).all()  # same coords
    assert (table["tiles/s"] > 0).all() and table.loc["needle_fp32", "× needle_fp32"] == 1.0
    assert (table["cos to fp32 (min)"] > 0.99).all() and (table["peak RSS MiB"] > 50).all()
    out = capsys.readouterr().out
    assert "× its encoder alone" in out and "tiling alone, Needle" in out
