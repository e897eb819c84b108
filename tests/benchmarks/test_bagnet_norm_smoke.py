"""Smoke test of benchmarks/bagnet_norm.py: quick mode trains one BagNet per norm on the same needle set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bagnet_norm_quick_trains_both_norms(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bagnet_norm", REPO / "benchmarks" / "bagnet_norm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.main(["--quick", "--source", "sklearn-digits", "--work-dir", str(tmp_path)])
    assert list(table["norm"]) == ["in_aff", "bn"] and (table["epoch"] == 1).all()
    assert table["val_acc"].between(0, 1).all() and (table["train_images_per_s"] > 0).all()
    assert table["train_loss"].notna().all()
