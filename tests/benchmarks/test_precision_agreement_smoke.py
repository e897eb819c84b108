"""Smoke test of benchmarks/precision_agreement.py: quick mode compares bf16 with fp32 features of real tiles."""

from __future__ import annotations

from tests.benchmarks import load_benchmark


def test_precision_agreement_quick(capsys) -> None:
    bench = load_benchmark("precision_agreement")
    table = bench.main(["--quick"])
    assert list(table["encoder"]) == ["resnet18"] and list(table["tiles"]) == [8]
    row = table.iloc[0]
    # bf16 rounds (8-bit mantissa): close to fp32 but not identical, or the two runs did not differ in precision
    assert 0.99 < row["cosine min"] <= row["cosine mean"] <= 1.0
    assert 0 < row["rel. L2 error mean"] <= row["rel. L2 error max"] < 0.1
    assert "cosine min" in capsys.readouterr().out
