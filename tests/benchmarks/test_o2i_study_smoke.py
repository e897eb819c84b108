"""Smoke test of benchmarks/o2i_study.py: quick mode makes image sets, trains every run, scores and plots."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]


def load_study():
    spec = importlib.util.spec_from_file_location("o2i_study", REPO / "benchmarks" / "o2i_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_o2i_study_quick_covers_every_canvas_norm_and_pooling(tmp_path: Path, capsys) -> None:
    study = load_study()
    args = ["--config", "quick", "--source", "sklearn-digits", "--seeds", "0", "--jobs", "1", "--work-dir", str(tmp_path)]
    points = study.main(args)
    groups = ["pooling=max, norm=bn", "pooling=max, norm=in_aff", "pooling=mean, norm=in_aff"]
    assert sorted(points["group"].unique()) == groups and len(points) == 5
    assert points["acc_mean"].between(0, 1).all() and points["n_failed"].between(0, 1).all()
    assert sorted(points["o2i"].round(4).unique(), reverse=True) == [round(64 / 16**2, 4), round(64 / 32**2, 4)]
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == 5 and runs["train_acc"].between(0, 1).all() and (runs["fitted"] == (runs["train_acc"] >= 0.99)).all()
    for name in ("o2i.png", "o2i.csv", "curves.png"):
        assert (tmp_path / name).stat().st_size > 500
    out = capsys.readouterr().out
    assert "failed" in out and "train acc (best)" in out and "target occlusion" in out
    assert len(list((tmp_path / "runs").glob("*/summary.csv"))) == 5  # (a rerun skips them: the stage's rule, tests/train)


def test_o2i_study_estimate_prints_expected_time(tmp_path: Path, capsys) -> None:
    load_study().main(["--config", "quick", "--source", "sklearn-digits", "--estimate", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "expected training time of --config quick" in out and "GFLOP per training image" in out and "canvas 16" in out
    assert not (tmp_path / "runs").exists()


def test_o2i_study_without_fashion_mnist_fails_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """No silent fallback to digits: without the data and without --source, exit 2, one line naming the package."""
    study = load_study()
    monkeypatch.setattr(study, "FASHION", tmp_path / "no-fashion-mnist")
    with pytest.raises(SystemExit) as exc:
        study.main(["--config", "quick", "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: Fashion-MNIST not found")
    assert "no-fashion-mnist" in err[0] and "dataset-fashion-mnist" in err[0] and not (tmp_path / "w").exists()
