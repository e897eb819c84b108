"""Smoke test of benchmarks/train_vs_torchmil.py: quick mode trains both sides on one cohort and prints the ratio."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark


@pytest.mark.skipif(importlib.util.find_spec("torchmil") is None, reason="torchmil not installed (the `bench` extra)")
def test_train_vs_torchmil_quick_has_both_sides_and_a_ratio(tmp_path: Path, capsys) -> None:
    bench = load_benchmark("train_vs_torchmil")
    work = tmp_path / "work"
    table = bench.main(["--quick", "--work-dir", str(work)])
    out = capsys.readouterr().out
    assert list(table["side"]) == ["ours", "torchmil"]
    for col in ("setup s", "epoch 1 s", "epoch s", "epoch s min", "epoch s max", "ms/step", "best epoch s"):
        assert (table[col] > 0).all(), table[col]
    assert (table["epoch s min"] <= table["epoch s"]).all() and (table["epoch s"] <= table["epoch s max"]).all()
    assert (table["best epoch s"] <= table["epoch s min"]).all()
    # same head size: ours carries one more bias (on the attention output) than torchmil's ABMIL
    assert table["params"][0] - table["params"][1] == 1, table["params"]
    ratios, ratio = table.attrs["ratios"], table.attrs["ratio"]
    assert len(ratios) == 1 and math.isfinite(ratio) and ratio > 0
    by = table.set_index("side")["epoch s"]
    assert ratio == pytest.approx(by["torchmil"] / by["ours"])  # the ratio is torchmil's epoch time over ours
    assert table.attrs["goal_met"] == (ratio >= 2.0)
    best = table.set_index("side")["best epoch s"]
    assert table.attrs["best_ratio"] == pytest.approx(best["torchmil"] / best["ours"])
    assert f"{ratio:.2f}x" in out and ("goal 2x met" in out or "goal 2x not met" in out)
    assert "ours" in out and "torchmil" in out
    assert (work / "cohort.json").is_file() and len(list(work.glob("*.h5"))) == 12 + 8  # a given work dir is kept
    assert not list(work.glob("run_*"))  # our run directories are removed
