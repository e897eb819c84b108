"""Smoke test of benchmarks/finetune_study.py: the quick configuration runs round 0 and one hard-negative
round through the `mil` commands and scores the test slides (slide, tile and lesion-vs-mimic AUC)."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks import load_benchmark


def test_finetune_study_quick(tmp_path: Path) -> None:
    study = load_benchmark("finetune_study")
    results = study.main(["--config", "quick", "--seeds", "1", "--rounds", "1", "--arms", "hard", "--out", str(tmp_path)])
    assert sorted(zip(results["arm"], results["round"])) == [("hard", 1), ("round0", 0)]
    for col in ("slide_auc", "tile_auc", "lesion_vs_mimic_auc", "val_auc"):
        assert results[col].between(0, 1).all(), results[col]
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "seed0" / "hard" / "rounds.csv").is_file()
