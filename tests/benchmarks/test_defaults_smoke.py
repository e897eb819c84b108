"""Smoke test of benchmarks/defaults.py: quick mode ranks every setting of the grid on validation AUC; reruns skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks import MUSK_DATA as DATA
from tests.benchmarks import load_benchmark


@pytest.mark.skipif(not (DATA / "musk1.csv").is_file(), reason=f"MUSK data not found at {DATA}")
def test_defaults_quick(tmp_path: Path) -> None:
    study = load_benchmark("defaults")
    res = study.main(["--quick", "--out", str(tmp_path)])
    assert sorted(res["setting"]) == sorted(study.setting_name(g) for g in study.GRID)
    assert res["val_auc"].between(0, 1).all() and sorted(res["rank"]) == [1.0, 2.0, 3.0, 4.0]
    runs = sorted((tmp_path / "runs").rglob("summary.csv"))
    assert len(runs) == 4 and not list((tmp_path / "runs").rglob("eval"))  # validation only: nothing scored on test
    stamp = [p.stat().st_mtime_ns for p in runs]
    study.main(["--quick", "--out", str(tmp_path)])  # every row is in results.csv: nothing trained again
    assert [p.stat().st_mtime_ns for p in runs] == stamp
