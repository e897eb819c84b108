"""Smoke test of benchmarks/bagnet_norm.py: quick mode trains one BagNet per norm on the same needle set."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks import load_benchmark



def test_bagnet_norm_quick_trains_both_norms(tmp_path: Path) -> None:
    bench = load_benchmark("bagnet_norm")
    table = bench.main(["--quick", "--source", "sklearn-digits", "--work-dir", str(tmp_path)])
    assert list(table["norm"]) == ["in_aff", "bn"] and (table["epoch"] == 1).all()
    assert table["val_acc"].between(0, 1).all() and (table["train_images_per_s"] > 0).all()
    assert table["train_loss"].notna().all()
