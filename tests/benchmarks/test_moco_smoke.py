"""Smoke test of benchmarks/moco.py: quick mode runs every launch, pretrains, and compares MoCo with random init."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark


@pytest.mark.slow  # ~80 s of CPU: five torch processes, MoCo, two feature runs, 4 × 5-fold abmil
def test_moco_quick_compares_with_random_init_raw_and_standardised(tmp_path: Path, capsys) -> None:
    bench = load_benchmark("moco")
    res = bench.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(res["throughput"]) == {"1x1", "1x2", "2x1"}
    assert all(r["images_per_s"] > 0 and math.isfinite(r["images_per_s"]) for r in res["throughput"].values())
    # the fair baseline is in the table itself: random init with --standardize beside MoCo with --standardize
    for key in ("slide_auc_moco", "slide_auc_random", "slide_auc_moco_std", "slide_auc_random_std"):
        assert len(res[key]) == 1 and 0 <= res[key][0] <= 1, (key, res[key])
    assert "| random | --standardize |" in out and "| moco | --standardize |" in out and "| random | raw |" in out
    # each speed-up column says what it divides by
    assert "÷ 1 process × 1 thread" in out and "÷ 1 process × 2 threads" in out
    for name in ("probe_moco", "probe_random", "gray_probe_moco", "gray_probe_random"):
        assert 0 <= res[name]["auc"] <= 1 and res[name]["positive_tiles"] > 0, name
    saved = json.loads((tmp_path / "quick" / "results.json").read_text())
    assert saved["slide_auc_random_std"] == res["slide_auc_random_std"]
