"""Smoke test of benchmarks/train_throughput.py: quick mode writes a cohort and runs every mode in its own process."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_throughput_quick_has_every_mode(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_throughput_benchmark", REPO / "benchmarks" / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    work = tmp_path / "work"
    table = bench.main(["--quick", "--work-dir", str(work)])
    assert list(table["mode"]) == ["plain", "ram", "stream", "stream-small"]
    assert list(table["bags"]) == [12, 12, 12, 6]
    for col in ("epoch 1 s", "epoch s", "ms/step", "peak RSS MiB", "RSS after imports MiB"):
        assert (table[col] > 0).all(), table[col]
    assert (table["peak RSS MiB"] >= table["RSS after imports MiB"]).all()
    assert math.isnan(table["load s"][0]) and (table["load s"][1:] >= 0).all()  # plain has no load step
    assert all(math.isfinite(v) and v > 0 for v in table.attrs["ratios"].values()), table.attrs["ratios"]
    assert (work / "cohort.json").is_file() and len(list(work.glob("*.h5"))) == 12 + 8  # a given work dir is kept
