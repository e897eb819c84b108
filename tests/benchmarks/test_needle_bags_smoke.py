"""Smoke test of benchmarks/needle_bags.py: quick mode trains every arm, reports the mined set, reruns skip."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks import load_benchmark


def test_needle_bags_quick(tmp_path: Path) -> None:
    nb = load_benchmark("needle_bags")
    out = tmp_path / "out"
    results = nb.main(["--quick", "--jobs", "1", "--out", str(out)])
    assert set(results["arm"]) == set(nb.DEFAULT_ARMS) and len(results) == len(nb.DEFAULT_ARMS)
    for col in ("bag_auc", "instance_auc", "witness_vs_mimic_auc"):
        assert results[col].between(0, 1).all(), results[col]
    mining = results[results["arm"].str.contains("hnm-wsi")]
    assert (mining["mined"] > 0).all() and mining["mined_mimic_share"].between(0, 1).all()
    assert {"results.csv", "metrics.csv", "pairs.csv", "needle_bags.png"} <= {p.name for p in out.iterdir()}
    curves = (out / "metrics.csv").read_text()
    again = nb.main(["--quick", "--jobs", "1", "--out", str(out)])  # every run is in results.csv: nothing trained
    assert len(again) == len(results) and (out / "metrics.csv").read_text() == curves
