"""Smoke test of benchmarks/o2i_study.py: quick mode makes image sets, trains every run, plots, and a rerun skips."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_o2i_study_quick_covers_every_canvas_and_pooling(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("o2i_study", REPO / "benchmarks" / "o2i_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    args = ["--quick", "--source", "sklearn-digits", "--work-dir", str(tmp_path)]
    points = study.main(args)
    assert sorted(points["group"].unique()) == ["pooling=max", "pooling=mean"]
    assert len(points) == 4 and points["acc_mean"].between(0, 1).all()
    assert sorted(points["o2i"].round(4).unique(), reverse=True) == [round(784 / 32**2, 4), round(784 / 64**2, 4)]
    assert (tmp_path / "o2i.png").is_file() and (tmp_path / "o2i.csv").is_file()
    assert len(list((tmp_path / "runs").glob("*/summary.csv"))) == 4
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/summary.csv")}
    study.main(args)  # finished runs are skipped, not retrained
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_o2i_study_without_fashion_mnist_fails_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """No silent fallback to digits: without the data and without --source, exit 2, one line naming the package."""
    import pytest

    spec = importlib.util.spec_from_file_location("o2i_study", REPO / "benchmarks" / "o2i_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.setattr(study, "FASHION", tmp_path / "no-fashion-mnist")
    with pytest.raises(SystemExit) as exc:
        study.main(["--quick", "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: Fashion-MNIST not found")
    assert "no-fashion-mnist" in err[0] and "dataset-fashion-mnist" in err[0] and not (tmp_path / "w").exists()
