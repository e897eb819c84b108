"""Smoke test of benchmarks/musk.py: quick mode on MUSK1 through import, training (plain heads and the hnm-wsi recipe) and every baseline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.benchmarks import MUSK_DATA as DATA
from tests.benchmarks import load_benchmark


@pytest.mark.skipif(not (DATA / "musk1.csv").is_file(), reason=f"MUSK data not found at {DATA}")
def test_musk_quick_has_every_method(tmp_path: Path) -> None:
    musk = load_benchmark("musk")
    out = tmp_path / "table.csv"
    table = musk.main(
        [
            "--quick",
            "--datasets",
            "musk1",
            "--data-dir",
            str(DATA),
            "--work-dir",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--methods",
            "abmil,gated_abmil,dsmil+hnm-wsi",
        ]
    )
    torchmil = {"torchmil_abmil_defaults", "torchmil_abmil_ours"} if importlib.util.find_spec("torchmil") else set()
    methods = {"abmil", "gated_abmil", "dsmil+hnm-wsi", "meanpool_logreg"} | torchmil
    assert set(table["method"]) == methods and set(table["dataset"]) == {"musk1"}
    assert (table["n_folds"] == 3).all()
    for col in ("acc@0.5", "acc@val_thr", "auc"):
        assert table[col].between(0, 1).all(), table[col]
    assert out.is_file()


def test_musk_without_data_fails_with_one_line(tmp_path: Path, capsys) -> None:
    """A missing data folder stops before any work: exit 2 and one `error:` line naming the file and MIL_SHARED_DATA."""
    musk = load_benchmark("musk")
    with pytest.raises(SystemExit) as exc:
        musk.main(["--quick", "--datasets", "musk1", "--data-dir", str(tmp_path / "nowhere"), "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: MUSK data not found")
    assert "nowhere/musk1.csv" in err[0] and "MIL_SHARED_DATA" in err[0] and not (tmp_path / "w").exists()
